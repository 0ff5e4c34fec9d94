"""Calibration of --tetris-capacity auto is exported on /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tetrispec.engine.async_engine import EngineSnapshot
from tetrispec.server.metrics import ServerMetrics


class FakeEngine:
    def __init__(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot

    def num_waiting(self) -> int:
        return 0

    def add_listener(self, fn) -> None:
        pass


def test_calibration_gauges():
    cal = {"observations": 1234, "ece": 0.031, "ece_floor": 0.012, "last_capacity": 17,
           "table": [{"bin": [0.5, 0.55], "count": 40, "mean_estimate": 0.52, "acceptance_rate": 0.5}]}
    text = ServerMetrics(FakeEngine(EngineSnapshot(selector="tetris-auto", calibration=cal)), "m").render().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("tetrispec:acceptance_estimator_ece", (("model_name", "m"),))] == 0.031
    assert samples[("tetrispec:acceptance_estimator_ece_floor", (("model_name", "m"),))] == 0.012
    assert samples[("tetrispec:spec_capacity", (("model_name", "m"),))] == 17
    key = ("tetrispec:acceptance_reliability", (("bin", "0.50"), ("kind", "observed"), ("model_name", "m")))
    assert samples[key] == 0.5


def test_no_calibration_gauges_without_auto():
    text = ServerMetrics(FakeEngine(EngineSnapshot(selector="tetris")), "m").render().decode()
    assert "acceptance_estimator_ece" not in text and "tetrispec:spec_selector_info" in text

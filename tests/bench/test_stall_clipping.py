"""The concurrency sweep's stall-clipped decode time (benchmarks/interleave.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tetrispec.spec.cost_model import StepRecord

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from interleave import STALL, stall_clipped_seconds  # noqa: E402


def test_a_stall_counts_as_its_shapes_median_times_stall():
    steady = [StepRecord(4, 8, 1, 100.0, 0.05)] * 10
    stalled = StepRecord(4, 8, 1, 120.0, 1.0)  # same shape (batch, tokens, depth), another context
    rare = [StepRecord(2, 2, 0, 100.0, 0.5), StepRecord(2, 2, 0, 100.0, 0.02)]  # under 3 steps: as timed
    assert stall_clipped_seconds(steady + [stalled] + rare) == pytest.approx(0.5 + STALL * 0.05 + 0.52)
    assert stall_clipped_seconds(steady) == pytest.approx(0.5)  # nothing to clip

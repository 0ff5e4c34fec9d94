"""Prometheus metrics for /metrics, with vLLM's names where vLLM has one.

Two sources. Latency histograms (TTFT, inter-token, end-to-end) and finished-request counts
are observed from the request deltas the engine thread emits. Everything else (queue sizes,
KV usage, token and speculation totals) is read at scrape time from the engine snapshot, so
the counters are the engine's own totals and can never drift from them.

Speculation counters, per request-step (one request in one decode step):
  vllm:spec_decode_num_drafts                   request-steps that drafted
  vllm:spec_decode_num_draft_tokens             tokens the draft proposed (Tetris extras included)
  vllm:spec_decode_num_accepted_tokens          drafts accepted
  vllm:spec_decode_num_accepted_tokens_per_pos  drafts accepted at position {position}
  tetrispec:spec_{drafted,verified,accepted}_tokens_total, tetrispec:spec_request_steps_total
  tetrispec:spec_verification_success_rate      accepted / verified over the run (VSR)
  tetrispec:spec_selector_info{selector=...}    which selector runs (none | fixed | tetris | dsd)
Each registry belongs to one app, so a process (a test) may build several.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tetrispec.engine.async_engine import AsyncEngine, RequestDelta

# vLLM's buckets, so dashboards built for vLLM read tetrispec the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels, reg = ["model_name"], self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between a request's engine steps (one step may emit several tokens).",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=reg)
        reg.register(_EngineCollector(engine, model_name))
        engine.add_listener(self.observe)

    def observe(self, delta: RequestDelta) -> None:
        """One delta from the engine thread (prometheus_client metrics are thread-safe)."""
        if delta.prev_time is None and delta.first_token_time is not None and delta.token_ids:
            self.ttft.observe(delta.first_token_time - delta.arrival_time)
        elif delta.prev_time is not None and delta.token_ids:
            self.itl.observe(delta.time - delta.prev_time)
        if delta.finished:
            self.e2e.observe(delta.time - delta.arrival_time)
            self.success.labels(self.model_name, delta.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the engine snapshot at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        snap, name = self.engine.snapshot, self.model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        spec = snap.spec
        yield gauge("vllm:num_requests_running", "Requests in the running batch.", snap.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", self.engine.num_waiting())
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", snap.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Prefilled prompt tokens.", snap.num_prompt_tokens)
        yield counter("vllm:generation_tokens", "Generated tokens.", snap.num_generation_tokens)
        yield counter("vllm:num_preemptions", "Preemptions (recompute).", snap.num_preemptions)
        yield counter("vllm:spec_decode_num_drafts", "Request-steps that drafted.", spec.spec_request_steps)
        yield counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens (Tetris' unselected extras included).",
                      spec.drafted)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens.", spec.accepted)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted draft tokens by position in the draft.",
                                      labels=["model_name", "position"])
        for j, accepted in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([name, str(j)], accepted)
        yield per_pos
        yield counter("tetrispec:spec_drafted_tokens", "Drafted tokens, selected or not.", spec.drafted)
        yield counter("tetrispec:spec_verified_tokens", "Drafted tokens sent to the target for verification.",
                      spec.verified)
        yield counter("tetrispec:spec_accepted_tokens", "Verified drafts accepted.", spec.accepted)
        yield counter("tetrispec:spec_request_steps", "Request-steps that drafted.", spec.spec_request_steps)
        yield counter("tetrispec:decode_request_steps", "Request-steps of decoding, speculative or not.",
                      spec.request_steps)
        yield counter("tetrispec:spec_emitted_tokens", "Tokens emitted by decode steps.", spec.emitted)
        yield gauge("tetrispec:spec_verification_success_rate", "Verification success rate: accepted / verified.",
                    spec.accepted / spec.verified if spec.verified else 0.0)
        info = GaugeMetricFamily("tetrispec:spec_selector_info", "The speculation selector in use.",
                                 labels=["model_name", "selector"])
        info.add_metric([name, snap.selector], 1.0)
        yield info
        if snap.calibration is not None:
            cal = snap.calibration
            yield gauge("tetrispec:acceptance_estimator_ece",
                        "Expected calibration error of the acceptance estimates used after warm-up.",
                        cal["ece"] if cal["ece"] is not None else float("nan"))
            yield gauge("tetrispec:acceptance_estimator_ece_floor",
                        "ECE a perfectly calibrated estimator would show by chance with these bin counts.",
                        cal["ece_floor"] if cal["ece_floor"] is not None else float("nan"))
            yield gauge("tetrispec:acceptance_estimator_observations", "Verification outcomes learned from.",
                        cal["observations"])
            yield gauge("tetrispec:spec_capacity", "Drafts verified in the last speculative step (chosen C).",
                        cal["last_capacity"])
            rel = GaugeMetricFamily("tetrispec:acceptance_reliability",
                                    "Reliability table: mean estimate and observed acceptance per estimate bin.",
                                    labels=["model_name", "bin", "kind"])
            for row in cal["table"]:
                low = f"{row['bin'][0]:.2f}"
                rel.add_metric([name, low, "estimate"], row["mean_estimate"])
                rel.add_metric([name, low, "observed"], row["acceptance_rate"])
                rel.add_metric([name, low, "count"], row["count"])
            yield rel

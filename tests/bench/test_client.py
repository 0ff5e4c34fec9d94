"""The load generator against a small fake OpenAI-compatible streaming server.

The fake server streams one word per SSE chunk with a short sleep, records the largest
number of requests in flight, and serves /metrics counters that grow with every request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tetrispec.bench.client import format_table, parse_spec_metrics, run_benchmark, spec_deltas, summarize
from tetrispec.bench.datasets import BenchRequest

TOKEN_DELAY = 0.004  # s between streamed chunks
BASE = {"draft": 100.0, "accepted": 50.0, "verified": 80.0, "drafts": 30.0}  # counters before any test


@dataclass
class FakeState:
    in_flight: int = 0
    max_in_flight: int = 0
    served: int = 0
    metrics_enabled: bool = True
    last_auth: str | None = None
    last_body: dict | None = None


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        n = body["max_tokens"]
        try:
            for i in range(n):
                await asyncio.sleep(TOKEN_DELAY)
                text = f"w{i} "
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage") and not body.get("no_usage"):
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        finally:
            state.in_flight -= 1  # before [DONE], so a freed client slot never overlaps this request
            state.served += 1
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.last_auth = request.headers.get("authorization")
        state.last_body = body
        if body.get("prompt") == "FAIL":
            return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/metrics")
    async def metrics():
        if not state.metrics_enabled:
            return PlainTextResponse("not found", status_code=404)
        k = state.served
        lines = [
            "# TYPE vllm:spec_decode_num_draft_tokens counter",
            f'vllm:spec_decode_num_draft_tokens_total{{model_name="fake"}} {BASE["draft"] + 10 * k}',
            "# TYPE vllm:spec_decode_num_accepted_tokens counter",
            f'vllm:spec_decode_num_accepted_tokens_total{{model_name="fake"}} {BASE["accepted"] + 6 * k}',
            "# TYPE vllm:spec_decode_num_drafts counter",
            f'vllm:spec_decode_num_drafts_total{{model_name="fake"}} {BASE["drafts"] + 3 * k}',
            "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter",
            f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake",position="0"}} {4 * k}',
            "# TYPE tetrispec:spec_verified_tokens counter",
            f"tetrispec:spec_verified_tokens_total {BASE['verified'] + 8 * k}",
            "# TYPE vllm:prompt_tokens counter",
            f'vllm:prompt_tokens_total{{model_name="fake"}} {3 * k}',
            "# TYPE vllm:spec_decode_draft_acceptance_rate gauge",
            'vllm:spec_decode_draft_acceptance_rate{model_name="fake"} 0.5',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


@pytest.fixture(scope="module")
def server():
    """(base_url, state): uvicorn on a free 127.0.0.1 port in a daemon thread."""
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(server):
    url, state = server
    state.max_in_flight = 0
    state.metrics_enabled = True
    return url, state


def bench(url: str, reqs: list[BenchRequest], **kw):
    kw.setdefault("progress", False)
    kw.setdefault("request_timeout", 10.0)
    return asyncio.run(asyncio.wait_for(run_benchmark(url, "fake", reqs, **kw), timeout=30))


def requests(n: int, output_len: int = 5) -> list[BenchRequest]:
    return [BenchRequest(f"prompt {i}", prompt_len=2, output_len=output_len) for i in range(n)]


def test_burst_completes_with_sane_timings_and_counter_deltas(fake):
    url, state = fake
    result = bench(url, requests(8, output_len=6))
    assert all(r.success for r in result.results), [r.error for r in result.results]
    for r in result.results:
        assert 0 < r.ttft < r.latency and r.output_tokens == 6 and len(r.itl) == 5
        assert r.text == "w0 w1 w2 w3 w4 w5 "
    s = summarize(result)
    assert (s["completed"], s["failed"], s["total_output_tokens"], s["total_input_tokens"]) == (8, 0, 48, 16)
    assert s["output_throughput"] == pytest.approx(48 / s["duration_s"])
    assert s["mean_ttft_ms"] < s["mean_e2el_ms"] and s["p99_e2el_ms"] >= s["median_e2el_ms"]
    assert s["mean_tpot_ms"] >= 1000 * TOKEN_DELAY * 0.5
    assert s["vllm:spec_decode_num_draft_tokens"] == 80 and s["vllm:spec_decode_num_accepted_tokens"] == 48
    assert s["tetrispec:spec_verified_tokens"] == 64
    assert s['vllm:spec_decode_num_accepted_tokens_per_pos{position="0"}'] == 32
    assert "vllm:prompt_tokens" not in s and "vllm:spec_decode_draft_acceptance_rate" not in s
    assert s["spec_draft_acceptance_rate"] == pytest.approx(0.6)
    assert s["spec_vsr"] == pytest.approx(0.75)
    assert s["spec_mean_accepted_length"] == pytest.approx(2.0)
    assert result.metrics_before["vllm:spec_decode_num_draft_tokens"] >= BASE["draft"]
    table = format_table(s)
    assert "output_throughput" in table and "spec_vsr" in table


def test_max_concurrency_is_respected(fake):
    url, state = fake
    result = bench(url, requests(12, output_len=8), max_concurrency=3)
    assert all(r.success for r in result.results)
    assert state.max_in_flight == 3


def test_poisson_arrivals_take_the_expected_time(fake):
    url, _ = fake
    n, rate, seed = 10, 40.0, 7
    rng = random.Random(seed)
    arrivals = [0.0] + list(itertools.accumulate(rng.expovariate(rate) for _ in range(n - 1)))
    result = bench(url, requests(n, output_len=2), request_rate=rate, seed=seed)
    starts = [r.start for r in result.results]
    for start, due in zip(starts, arrivals, strict=True):
        assert due - 1e-3 <= start <= due + 0.25
    assert arrivals[-1] <= result.duration <= arrivals[-1] + 2.0
    burst = bench(url, requests(n, output_len=2), request_rate=math.inf)
    assert max(r.start for r in burst.results) < 0.25


def test_chat_prompts_go_to_the_chat_endpoint_with_options(fake):
    url, state = fake
    reqs = [BenchRequest([{"role": "user", "content": "hi"}], prompt_len=1, output_len=4)]
    result = bench(url, reqs, api_key="sk-test", ignore_eos=True)
    r = result.results[0]
    assert r.success and r.text == "w0 w1 w2 w3 " and r.output_tokens == 4
    assert state.last_auth == "Bearer sk-test"
    body = state.last_body
    assert body["messages"] == reqs[0].prompt and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_without_usage_output_is_retokenized(fake):
    url, _ = fake

    class CharTokenizer:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    reqs = requests(1, output_len=3)
    r = bench(url, reqs, tokenizer=CharTokenizer(), extra_body={"no_usage": True}).results[0]
    assert r.output_tokens == len("w0 w1 w2 ")
    r = bench(url, reqs, extra_body={"no_usage": True}).results[0]
    assert r.output_tokens == 3  # no tokenizer: one token per chunk


def test_failures_and_missing_metrics_are_tolerated(fake):
    url, state = fake
    state.metrics_enabled = False
    reqs = requests(2) + [BenchRequest("FAIL", prompt_len=1, output_len=3)]
    result = bench(url + "/v1/", reqs)
    s = summarize(result)
    assert (s["completed"], s["failed"]) == (2, 1) and "HTTP 400" in s["errors"]
    assert result.metrics_after is None and not any(k.startswith("spec_") for k in s)


def test_unreachable_server_gives_failed_requests_not_a_crash():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = bench(f"http://127.0.0.1:{port}", requests(2))
    s = summarize(result)
    assert s["failed"] == 2 and s["completed"] == 0 and s["mean_ttft_ms"] is None
    assert "ConnectError" in s["errors"]


def test_metric_parsing_and_deltas_without_a_server():
    text = ("# TYPE tetrispec:spec_accepted_tokens counter\n"
            'tetrispec:spec_accepted_tokens_total{model_name="a"} 5\n'
            'tetrispec:spec_accepted_tokens_total{model_name="b"} 7\n'
            "# TYPE tetrispec:spec_drafted_tokens counter\n"
            "tetrispec:spec_drafted_tokens_total 40\n")
    after = parse_spec_metrics(text)
    assert after == {"tetrispec:spec_accepted_tokens": 12.0, "tetrispec:spec_drafted_tokens": 40.0}
    d = spec_deltas({"tetrispec:spec_accepted_tokens": 2.0, "tetrispec:spec_drafted_tokens": 20.0}, after)
    assert d["tetrispec:spec_accepted_tokens"] == 10 and d["spec_draft_acceptance_rate"] == pytest.approx(0.5)
    assert d["spec_vsr"] == pytest.approx(0.5)  # no verified counter: every draft was verified
    assert spec_deltas(None, None) == {}
    with pytest.raises(ValueError):
        bench("http://127.0.0.1:1", requests(1), request_rate=0.0)

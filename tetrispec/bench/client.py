"""Async load generator against any OpenAI-compatible server (tetrispec, vLLM, ...).

It follows the paper's serving protocol (REFERENCE section 4): requests arrive as a Poisson
process (`request_rate=inf` sends them all at once), at most `max_concurrency` are in flight,
each streams its completion at temperature 0 so TTFT and inter-token latencies are seen as
the client sees them. The server's speculation counters are read from /metrics before and
after the run, so acceptance rate and VSR come from the same run as the throughput.

Timing notes: a request's clock starts when it gets a concurrency slot, not when it arrives
(vLLM's convention, so TTFT measures the server and not the client's queue), and one
streamed chunk may carry several tokens (a speculative step emits up to k+1), so `itl`
holds gaps between chunks, while TPOT divides by the token count and is the fairer number
for speculative decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from tetrispec.bench.datasets import BenchRequest

logger = logging.getLogger(__name__)

SPEC_PREFIXES = ("vllm:spec_decode", "tetrispec:")
IGNORED_LABELS = {"model_name", "engine"}  # summed over; other labels (e.g. position) stay in the key


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    success: bool = False
    error: str = ""
    text: str = ""
    output_tokens: int = 0
    ttft: float = 0.0  # s from send to the first chunk with text
    itl: list[float] = field(default_factory=list)  # s between consecutive chunks with text
    latency: float = 0.0  # s from send to the end of the stream
    start: float = 0.0  # s since the benchmark started, when the request was sent


@dataclass
class BenchResult:
    model: str
    base_url: str
    request_rate: float
    max_concurrency: int | None
    duration: float  # s from the first arrival to the last completion
    results: list[RequestResult]
    metrics_before: dict[str, float] | None = None  # spec counters; None when /metrics is absent
    metrics_after: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------
# /metrics


def parse_spec_metrics(text: str) -> dict[str, float]:
    """Counter samples whose names start with SPEC_PREFIXES, summed over IGNORED_LABELS.

    Keys drop the `_total` suffix (`vllm:spec_decode_num_draft_tokens`); remaining labels are
    kept in the key (`...accepted_tokens_per_pos{position="0"}`).
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(SPEC_PREFIXES) or family.type not in ("counter", "unknown"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name.removesuffix("_total")
            kept = sorted((k, v) for k, v in sample.labels.items() if k not in IGNORED_LABELS)
            labels = ",".join(f'{k}="{v}"' for k, v in kept)
            key = f"{name}{{{labels}}}" if labels else name
            out[key] = out.get(key, 0.0) + sample.value
    return out


async def scrape_metrics(client: httpx.AsyncClient, root: str) -> dict[str, float] | None:
    """GET {root}/metrics; None (not an error) when the server has none or it does not parse."""
    try:
        resp = await client.get(f"{root}/metrics", timeout=10.0)
        if resp.status_code != 200:
            return None
        return parse_spec_metrics(resp.text)
    except (httpx.HTTPError, ValueError) as e:
        logger.warning("could not read %s/metrics: %s", root, e)
        return None


def _find(counters: dict[str, float], *suffixes: str) -> float | None:
    """The first unlabeled counter ending with one of `suffixes`, tetrispec's before vLLM's."""
    for prefix in ("tetrispec:", "vllm:"):
        for suffix in suffixes:
            for key, value in counters.items():
                if key.startswith(prefix) and key.endswith(suffix) and "{" not in key:
                    return value
    return None


def spec_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """Counter deltas over the run plus the derived rates of REFERENCE section 3.

    draft_acceptance_rate = accepted / drafted, vsr = accepted / verified (vLLM verifies every
    draft, so there drafted stands in for verified), mean_accepted_length = accepted per
    speculative request-step (vLLM: per draft).
    """
    if after is None:
        return {}
    before = before or {}
    deltas = {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}
    drafted = _find(deltas, "num_draft_tokens", "drafted_tokens")
    verified = _find(deltas, "verified_tokens")
    accepted = _find(deltas, "num_accepted_tokens", "accepted_tokens")
    steps = _find(deltas, "num_drafts", "spec_request_steps")
    verified = drafted if verified is None else verified
    if accepted is not None and drafted:
        deltas["spec_draft_acceptance_rate"] = accepted / drafted
    if accepted is not None and verified:
        deltas["spec_vsr"] = accepted / verified
    if accepted is not None and steps:
        deltas["spec_mean_accepted_length"] = accepted / steps
    return deltas


# ---------------------------------------------------------------------------------------------
# One request


def _api_root(base_url: str) -> str:
    """http://host:port from either http://host:port or http://host:port/v1."""
    return base_url.rstrip("/").removesuffix("/v1")


def _payload(model: str, req: BenchRequest, temperature: float, ignore_eos: bool,
             extra_body: dict | None) -> dict:
    is_chat = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], dict)
    body: dict[str, Any] = {
        "model": model,
        "messages" if is_chat else "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / tetrispec extension: always generate max_tokens
    body.update(extra_body or {})
    return body


async def send_request(client: httpx.AsyncClient, root: str, body: dict, prompt_len: int,
                       tokenizer: Any = None, t0: float = 0.0) -> RequestResult:
    """Stream one completion (chat if `body` has messages) and time every chunk with text."""
    chat = "messages" in body
    url = f"{root}/v1/chat/completions" if chat else f"{root}/v1/completions"
    result = RequestResult(prompt_len=prompt_len, max_tokens=body.get("max_tokens", 0))
    pieces: list[str] = []
    chunks = 0
    usage_tokens: int | None = None
    start = time.perf_counter()
    result.start = start - t0
    last = start
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {detail[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    pieces.append(text)
        result.latency = time.perf_counter() - start
        result.text = "".join(pieces)
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif tokenizer is not None:
            ids = tokenizer.encode(result.text)
            result.output_tokens = len(getattr(ids, "ids", ids))
        else:
            result.output_tokens = chunks  # best guess: one token per chunk
        result.success = chunks > 0 or result.output_tokens > 0
        if not result.success:
            result.error = "empty stream: no text and no usage"
    except Exception as e:  # a failed request is a data point, never a crash of the run
        result.latency = time.perf_counter() - start
        result.error = " ".join(f"{type(e).__name__}: {e}".split())
    return result


# ---------------------------------------------------------------------------------------------
# The run


async def run_benchmark(base_url: str, model: str, requests: list[BenchRequest],
                        request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                        api_key: str | None = None, tokenizer: Any = None, ignore_eos: bool = False,
                        progress: bool = True, temperature: float = 0.0, extra_body: dict | None = None,
                        request_timeout: float = 6 * 3600.0) -> BenchResult:
    """Send `requests` with Poisson arrivals at `request_rate` per second; see the module doc.

    `tokenizer.encode` counts output tokens only when the server sends no usage chunk.
    """
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf for a burst), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    root = _api_root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    rng = random.Random(seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="bench", unit="req")

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        before = await scrape_metrics(client, root)
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            async with slots or contextlib.nullcontext():
                body = _payload(model, req, temperature, ignore_eos, extra_body)
                res = await send_request(client, root, body, req.prompt_len, tokenizer, t0)
            bar.update(1)
            return res

        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        after = await scrape_metrics(client, root)
    bar.close()
    return BenchResult(model, base_url, request_rate, max_concurrency, duration, results, before, after)


# ---------------------------------------------------------------------------------------------
# Report


def _stats(prefix: str, values: list[float]) -> dict[str, float | None]:
    """mean / median / p99 in ms, p99 = sorted[int(0.99 n)] as in the paper."""
    if not values:
        return {f"mean_{prefix}_ms": None, f"median_{prefix}_ms": None, f"p99_{prefix}_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(int(0.99 * len(ordered)), len(ordered) - 1)]
    return {f"mean_{prefix}_ms": 1000 * statistics.fmean(ordered),
            f"median_{prefix}_ms": 1000 * statistics.median(ordered),
            f"p99_{prefix}_ms": 1000 * p99}


def summarize(result: BenchResult) -> dict[str, Any]:
    """Flat dict (one CSV row): throughput, latency stats of successful requests, spec deltas."""
    ok = [r for r in result.results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    duration = result.duration
    summary: dict[str, Any] = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(result.results) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    summary |= _stats("ttft", [r.ttft for r in ok])
    summary |= _stats("tpot", [(r.latency - r.ttft) / (r.output_tokens - 1)
                               for r in ok if r.output_tokens > 1])
    summary |= _stats("itl", [gap for r in ok for gap in r.itl])
    summary |= _stats("e2el", [r.latency for r in ok])
    summary |= spec_deltas(result.metrics_before, result.metrics_after)
    errors = sorted({r.error for r in result.results if not r.success})
    if errors:
        summary["errors"] = " | ".join(errors[:3])  # distinct messages, a few suffice to diagnose
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Aligned `name  value` lines for the terminal."""
    width = max((len(k) for k in summary), default=0)
    lines = ["=" * (width + 16)]
    for key, value in summary.items():
        if isinstance(value, float) and ":" in key and value.is_integer():
            text = str(int(value))  # a server counter
        elif isinstance(value, float):
            text = f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
        elif value is None:
            text = "-"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text:>12}")
    lines.append("=" * (width + 16))
    return "\n".join(lines)

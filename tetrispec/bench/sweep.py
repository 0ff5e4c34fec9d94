"""Method sweeps: one fresh server per grid point, the same prompts, a row per run, plots.

Each grid point (no speculation, fixed k, Tetris k x e, DSD) gets its own `tetrispec serve`
subprocess with the same engine flags and seed, so the only thing that differs between rows
is the speculation method. The server answers a short warm-up first (one-time costs such as
lazy allocations stay out of repeat 0), then the same prompts are replayed `repeats` times.
Speculation metrics come from the server's /metrics counters read around each run.

Rows go to results.json (the source of truth, rewritten atomically after every run, with
per-request latencies for the CDF) and results.csv (the same rows, scalar columns). A run
is identified by (config, repeat): an interrupted sweep started again skips every run
already in results.json, and refuses to mix rows made with different settings.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tetrispec.bench.client import BenchResult, run_benchmark, summarize
from tetrispec.bench.datasets import BenchRequest

logger = logging.getLogger(__name__)

METHODS = ("none", "fixed", "tetris", "dsd")
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SERVED_NAME = "tetrispec-sweep"
# `python -m tetrispec.cli serve`, but importing main: under -m the module runs as __main__, whose
# CLIError is not the tetrispec.cli.CLIError that commands raise, so user errors would print tracebacks.
SERVE_CMD = (sys.executable, "-c", "import sys; from tetrispec.cli import main; sys.exit(main())", "serve")
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8
CSV_COLUMNS = [
    "config", "method", "k", "e", "capacity", "repeat", "num_requests", "completed", "failed", "duration_s",
    "output_throughput", "request_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    "vsr", "draft_acceptance_rate", "system_efficiency", "mean_accepted_length",
    "drafted_tokens", "verified_tokens", "accepted_tokens", "request_steps", "spec_request_steps",
    "server_start_s", "errors",
]


class SweepError(RuntimeError):
    """A server that would not start, or results that cannot be resumed; one line."""


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class GridPoint:
    method: str  # one of METHODS
    k: int | None = None  # fixed / tetris: k; dsd: K_max; none: None
    e: int | None = None  # tetris: extra proposals
    capacity: str | None = None  # tetris: None (k * B), "auto", or an integer as text

    @property
    def name(self) -> str:
        """The row key: none, fixed-k2, tetris-k2-e1, tetris-k2-e1-cauto, dsd-k6."""
        parts = [self.method]
        parts += [f"k{self.k}"] if self.k is not None else []
        parts += [f"e{self.e}"] if self.e is not None else []
        parts += [f"c{self.capacity}"] if self.capacity is not None else []
        return "-".join(parts)

    def server_flags(self) -> list[str]:
        flags = ["--spec-method", self.method]
        if self.method in ("fixed", "tetris"):
            flags += ["--num-speculative-tokens", str(self.k)]
        if self.method == "tetris":
            flags += ["--tetris-extra-proposals", str(self.e)]
            flags += ["--tetris-capacity", self.capacity] if self.capacity is not None else []
        if self.method == "dsd":
            flags += ["--dsd-max-k", str(self.k)]
        return flags


def make_grid(methods: Sequence[str], ks: Sequence[int], es: Sequence[int], dsd_max_k: int,
              capacities: Sequence[str | None] = (None,)) -> list[GridPoint]:
    """none, then fixed over k, tetris over k x e x capacity, then dsd: the sweep's run order."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    grid: list[GridPoint] = []
    if "none" in methods:
        grid.append(GridPoint("none"))
    if "fixed" in methods:
        grid += [GridPoint("fixed", k) for k in ks]
    if "tetris" in methods:
        grid += [GridPoint("tetris", k, e, c) for k in ks for e in es for c in capacities]
    if "dsd" in methods:
        grid.append(GridPoint("dsd", dsd_max_k))
    return grid


# ---------------------------------------------------------------------------------------------
# One server


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class ServerProcess:
    """`tetrispec serve` on a free loopback port; `with ServerProcess(...) as url:` waits for /health.

    Output goes to `log_path`. Leaving the block sends SIGTERM, then SIGKILL after
    `stop_timeout` seconds, so an interrupted sweep never leaves a server behind.
    """

    def __init__(self, cmd: Sequence[str], log_path: Path, start_timeout: float = 600.0,
                 stop_timeout: float = 30.0) -> None:
        self.cmd, self.log_path = list(cmd), log_path
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.cmd)} --host 127.0.0.1 --port {port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([*self.cmd, "--host", "127.0.0.1", "--port", str(port)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise SweepError(f"server exited with code {code} before it was healthy "
                                 f"(log {self.log_path}): {_last_line(self.log_path)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SweepError(f"server not healthy after {self.start_timeout:.0f} s (log {self.log_path})")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("server pid %d ignored SIGTERM for %.0f s; killing it", self.proc.pid, self.stop_timeout)
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Rows


def _counter(deltas: dict[str, float], *names: str) -> float | None:
    for name in names:
        if name in deltas:
            return deltas[name]
    return None


def spec_metrics(deltas: dict[str, float], output_tokens: int, completed: int) -> dict[str, float | None]:
    """REFERENCE section 3 from /metrics counter deltas over one run.

    VSR = accepted / verified, draft acceptance rate = accepted / drafted, system efficiency =
    decode-emitted tokens / (verified + decode request-steps), mean accepted length = accepted
    per request-step that drafted. Without tetrispec's emitted counter (another server), the
    decode-emitted tokens are the output tokens less the one each request gets from its
    prefill, which is no request-step.
    """
    drafted = _counter(deltas, "tetrispec:spec_drafted_tokens", "vllm:spec_decode_num_draft_tokens")
    verified = _counter(deltas, "tetrispec:spec_verified_tokens")
    verified = drafted if verified is None else verified
    accepted = _counter(deltas, "tetrispec:spec_accepted_tokens", "vllm:spec_decode_num_accepted_tokens")
    steps = _counter(deltas, "tetrispec:decode_request_steps")
    spec_steps = _counter(deltas, "tetrispec:spec_request_steps", "vllm:spec_decode_num_drafts")
    emitted = _counter(deltas, "tetrispec:spec_emitted_tokens")
    emitted = output_tokens - completed if emitted is None else emitted

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "vsr": ratio(accepted, verified),
        "draft_acceptance_rate": ratio(accepted, drafted),
        "system_efficiency": ratio(emitted, (verified or 0) + steps) if steps is not None else None,
        "mean_accepted_length": ratio(accepted, spec_steps),
        "drafted_tokens": drafted, "verified_tokens": verified, "accepted_tokens": accepted,
        "request_steps": steps, "spec_request_steps": spec_steps,
    }


def make_row(point: GridPoint, repeat: int, result: BenchResult, server_start_s: float | None = None) -> dict:
    """One results row: the grid point, the client summary and the derived speculation metrics."""
    summary = summarize(result)
    row: dict[str, Any] = {"config": point.name, "method": point.method, "k": point.k, "e": point.e,
                           "capacity": point.capacity, "repeat": repeat, "num_requests": len(result.results)}
    row |= {k: v for k, v in summary.items() if k in CSV_COLUMNS}
    row |= spec_metrics({k: v for k, v in summary.items() if ":" in k},
                        summary["total_output_tokens"], summary["completed"])
    row["server_start_s"] = server_start_s
    row["errors"] = summary.get("errors", "")
    row["e2e_latencies_s"] = sorted(r.latency for r in result.results if r.success)
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def load_results(out_dir: Path) -> tuple[dict, list[dict]]:
    """(setup, rows) of out_dir/results.json; ({}, []) when there is none yet."""
    path = Path(out_dir) / RESULTS_JSON
    if not path.exists():
        return {}, []
    try:
        data = json.loads(path.read_text())
        return data["setup"], list(data["rows"])
    except (ValueError, KeyError, TypeError) as e:
        raise SweepError(f"{path}: not a sweep results file ({type(e).__name__}: {e})") from None


def save_results(out_dir: Path, setup: dict, rows: list[dict]) -> None:
    """results.json (atomically: an interrupt never leaves half a file) and results.csv."""
    out_dir = Path(out_dir)
    tmp = out_dir / (RESULTS_JSON + ".tmp")
    tmp.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    os.replace(tmp, out_dir / RESULTS_JSON)
    with open(out_dir / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def _check_setup(path: Path, old: dict, new: dict) -> None:
    new = json.loads(json.dumps(new))  # compare as stored (tuples become lists)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if old and diff:
        k = diff[0]
        raise SweepError(f"{path} was made with {k}={old.get(k)!r}, not {new.get(k)!r}: "
                         "use another --output-dir to sweep different settings")


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Sweep:
    """Run a grid: what every server gets, how the prompts are sent, where rows go."""

    out_dir: Path
    server_args: list[str]  # engine flags shared by every server: model, draft, max-num-seqs, seed, ...
    setup: dict = field(default_factory=dict)  # what makes rows comparable; checked when resuming
    repeats: int = 1
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    server_timeout: float = 600.0
    progress: bool = True
    server_cmd: list[str] = field(default_factory=lambda: list(SERVE_CMD))

    def _bench(self, url: str, requests: list[BenchRequest], tokenizer: Any, progress: bool) -> BenchResult:
        return asyncio.run(run_benchmark(
            url, SERVED_NAME, requests, request_rate=self.request_rate, max_concurrency=self.max_concurrency,
            seed=self.seed, tokenizer=tokenizer, ignore_eos=self.ignore_eos, progress=progress))

    def run(self, grid: list[GridPoint], requests: list[BenchRequest], tokenizer: Any = None) -> list[dict]:
        """Every (grid point, repeat) not yet in results.json; returns all rows."""
        out_dir = Path(self.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        old_setup, rows = load_results(out_dir)
        _check_setup(out_dir / RESULTS_JSON, old_setup, self.setup)
        setup = json.loads(json.dumps(self.setup))
        done = {(r["config"], r["repeat"]) for r in rows}
        warmup = [BenchRequest(r.prompt, r.prompt_len, min(r.output_len, WARMUP_TOKENS))
                  for r in requests[:WARMUP_REQUESTS]]
        for i, point in enumerate(grid, 1):
            todo = [r for r in range(self.repeats) if (point.name, r) not in done]
            tag = f"[{i}/{len(grid)}] {point.name}"
            if not todo:
                print(f"{tag}: all {self.repeats} repeats in {RESULTS_JSON}, skipped", file=sys.stderr)
                continue
            cmd = [*self.server_cmd, *self.server_args, *point.server_flags(), "--served-model-name", SERVED_NAME]
            t0 = time.perf_counter()
            with ServerProcess(cmd, out_dir / "logs" / f"{point.name}.log", self.server_timeout) as url:
                start_s = time.perf_counter() - t0
                self._bench(url, warmup, tokenizer, progress=False)
                for repeat in todo:
                    result = self._bench(url, requests, tokenizer, self.progress)
                    row = make_row(point, repeat, result, start_s)
                    rows.append(row)
                    save_results(out_dir, setup, rows)
                    vsr = "-" if row["vsr"] is None else f"{row['vsr']:.3f}"
                    print(f"{tag} repeat {repeat}: {row['output_throughput']:.1f} tok/s, VSR {vsr}, "
                          f"{row['completed']}/{row['num_requests']} ok in {row['duration_s']:.1f} s "
                          f"(server start {start_s:.1f} s)", file=sys.stderr)
        if not rows:
            save_results(out_dir, setup, rows)
        return rows


# ---------------------------------------------------------------------------------------------
# Plots


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _by_config(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["config"], []).append(row)
    return out


def _series_label(row: dict) -> str:
    if row["method"] == "tetris":
        return f"tetris e={row['e']}" + (f" C={row['capacity']}" if row.get("capacity") else "")
    return row["method"]


def _title(setup: dict) -> str:
    model = Path(str(setup.get("model") or "default pair")).name
    return (f"{model}, {setup.get('dataset', '?')} x{setup.get('num_requests', '?')}, "
            f"max-num-seqs {setup.get('max_num_seqs', '?')}")


def plot_vs_k(rows: list[dict], key: str, ylabel: str, path: Path, title: str = "") -> Path:
    """`key` (median over repeats) against k: a line per method (Tetris: per e), none and dsd flat."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    series: dict[str, list[tuple[int, float]]] = {}
    flat: list[tuple[str, float]] = []
    for runs in _by_config(rows).values():
        first, value = runs[0], _median(runs, key)
        if value is None:
            continue
        if first["method"] == "none":
            flat.append(("none (no speculation)", value))
        elif first["method"] == "dsd":
            flat.append((f"dsd (K_max={first['k']})", value))
        else:
            series.setdefault(_series_label(first), []).append((first["k"], value))
    for i, (label, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*sorted(points))  # shrinking markers keep series that coincide visible
        ax.plot(xs, ys, marker="osD^v<>"[i % 7], markersize=max(3, 9 - 2 * i), label=label)
    styles = iter(["--", ":", "-."])
    for label, value in flat:
        ax.axhline(value, linestyle=next(styles, "--"), color="gray" if label.startswith("none") else "black",
                   label=label)
    ks = sorted({k for points in series.values() for k, _ in points})
    if ks:
        ax.set_xticks(ks)
    ax.set_xlabel("k (num speculative tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if series or flat:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_latency_cdf(rows: list[dict], path: Path, title: str = "") -> Path:
    """End-to-end latency CDF per configuration, repeats pooled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for name, runs in _by_config(rows).items():
        lat = sorted(x for r in runs for x in r.get("e2e_latencies_s") or [])
        if lat:
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=name)
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
    return path


def plot_results(out_dir: Path) -> list[Path]:
    """throughput_vs_k.png, vsr_vs_k.png and latency_cdf.png from out_dir/results.json."""
    out_dir = Path(out_dir)
    setup, rows = load_results(out_dir)
    if not rows:
        raise SweepError(f"{out_dir / RESULTS_JSON}: no results to plot")
    title = _title(setup)
    return [
        plot_vs_k(rows, "output_throughput", "output throughput (tok/s)", out_dir / "throughput_vs_k.png",
                  title + "; median over repeats"),
        plot_vs_k(rows, "vsr", "verification success rate", out_dir / "vsr_vs_k.png", title + "; median over repeats"),
        plot_latency_cdf(rows, out_dir / "latency_cdf.png", title + "; repeats pooled"),
    ]

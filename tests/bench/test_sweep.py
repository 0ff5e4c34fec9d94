"""`tetrispec sweep` end to end against real `tetrispec serve` subprocesses (tiny pair), plus
the grid, the metric derivation, resume checks and plots without any server."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest

from tetrispec.bench.client import BenchResult, RequestResult
from tetrispec.bench.sweep import (
    CSV_COLUMNS,
    GridPoint,
    Sweep,
    SweepError,
    load_results,
    make_grid,
    make_row,
    plot_results,
    save_results,
    spec_metrics,
)
from tetrispec.cli import main
from tetrispec.commands import sweep as sweep_command

# Each server start loads two tiny checkpoints (~3 s on one thread); keep runs few and short.
COMMON = ["--methods", "fixed,tetris", "--num-speculative-tokens", "2", "--tetris-extra-proposals", "1",
          "--dataset", "random", "--input-len", "12", "--output-len", "12", "--num-requests", "8",
          "--max-num-seqs", "4", "--num-threads", "1", "--kv-cache-memory-gb", "0.02", "--no-progress"]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def server_starts(out_dir) -> int:
    """Lines the sweep wrote to the server logs: one `$ command` line per server start."""
    return sum(p.read_text().count("$ ") for p in (out_dir / "logs").glob("*.log"))


def test_two_configuration_sweep_end_to_end_and_resume(tiny_pair, tmp_path):
    target, draft = tiny_pair
    out = tmp_path / "sweep"
    argv = ["sweep", *COMMON, "--model", target, "--speculative-model", draft, "--output-dir", str(out)]
    assert main(argv) == 0

    rows = read_csv(out / "results.csv")
    assert [r["config"] for r in rows] == ["fixed-k2", "tetris-k2-e1"]
    assert list(rows[0]) == CSV_COLUMNS
    for r in rows:
        assert (r["completed"], r["failed"], r["repeat"], r["k"]) == ("8", "0", "0", "2")
        assert float(r["output_throughput"]) > 0 and float(r["p99_e2el_ms"]) >= float(r["median_e2el_ms"]) > 0
        assert 0 <= float(r["vsr"]) <= 1 and 0 <= float(r["draft_acceptance_rate"]) <= float(r["vsr"])
        assert float(r["verified_tokens"]) > 0 and float(r["system_efficiency"]) > 0
    fixed, tetris = rows
    assert fixed["drafted_tokens"] == fixed["verified_tokens"]  # fixed-k verifies every draft
    assert float(tetris["drafted_tokens"]) > float(tetris["verified_tokens"])  # e extra drafts, same capacity
    setup, json_rows = load_results(out)
    assert setup["num_requests"] == 8 and setup["request_rate"] == "inf"
    assert len(json_rows[0]["e2e_latencies_s"]) == 8
    for name in ("throughput_vs_k.png", "vsr_vs_k.png", "latency_cdf.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert server_starts(out) == 2

    # Run again: every row is there, no server starts.
    assert main(argv) == 0
    assert len(read_csv(out / "results.csv")) == 2 and server_starts(out) == 2

    # An interrupted sweep (the last row never written) redoes only the missing run.
    save_results(out, setup, json_rows[:1])
    assert main(argv) == 0
    rows = read_csv(out / "results.csv")
    assert [r["config"] for r in rows] == ["fixed-k2", "tetris-k2-e1"] and server_starts(out) == 3


def test_resume_refuses_other_settings_and_plot_only(tiny_pair, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    target, draft = tiny_pair
    argv = ["sweep", *COMMON, "--model", target, "--speculative-model", draft, "--output-dir", str(out)]
    parser = argparse.ArgumentParser()
    sweep_command.register(parser.add_subparsers())
    setup = sweep_command.setup_of(parser.parse_args(argv)) | {"num_requests": 16}
    save_results(out, setup, [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use another --output-dir" in err and "num_requests" in err
    assert main(["sweep", "--plot-only", str(out)]) == 2
    assert "no results to plot" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", "--methods", "fixed,magic", "--speculative-model", str(tmp_path)]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--model", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["sweep", "--model", str(tmp_path), "--methods", "tetris"]) == 2
    assert "--speculative-model" in capsys.readouterr().err


def test_grid_order_names_and_server_flags():
    grid = make_grid(["dsd", "tetris", "none", "fixed"], [1, 2], [1, 2], dsd_max_k=4, capacities=[None, "auto"])
    names = [p.name for p in grid]
    assert names[:3] == ["none", "fixed-k1", "fixed-k2"] and names[-1] == "dsd-k4"
    assert names[3:7] == ["tetris-k1-e1", "tetris-k1-e1-cauto", "tetris-k1-e2", "tetris-k1-e2-cauto"]
    assert len(set(names)) == len(names) == 1 + 2 + 8 + 1
    assert GridPoint("none").server_flags() == ["--spec-method", "none"]
    assert GridPoint("tetris", 3, 2, "auto").server_flags() == [
        "--spec-method", "tetris", "--num-speculative-tokens", "3", "--tetris-extra-proposals", "2",
        "--tetris-capacity", "auto"]
    assert GridPoint("dsd", 6).server_flags() == ["--spec-method", "dsd", "--dsd-max-k", "6"]
    with pytest.raises(ValueError, match="unknown method"):
        make_grid(["fast"], [1], [1], 1)


def test_spec_metrics_follow_the_reference_definitions():
    deltas = {"tetrispec:spec_drafted_tokens": 300.0, "tetrispec:spec_verified_tokens": 200.0,
              "tetrispec:spec_accepted_tokens": 120.0, "tetrispec:spec_request_steps": 80.0,
              "tetrispec:decode_request_steps": 100.0, "tetrispec:spec_emitted_tokens": 220.0}
    m = spec_metrics(deltas, output_tokens=230, completed=10)
    assert m["vsr"] == pytest.approx(0.6) and m["draft_acceptance_rate"] == pytest.approx(0.4)
    assert m["system_efficiency"] == pytest.approx(220 / 300)  # emitted / (verified + request-steps)
    assert m["mean_accepted_length"] == pytest.approx(1.5)  # per request-step that drafted
    vllm = {"vllm:spec_decode_num_draft_tokens": 40.0, "vllm:spec_decode_num_accepted_tokens": 10.0,
            "vllm:spec_decode_num_drafts": 10.0}  # another server: every draft verified, no step counter
    m = spec_metrics(vllm, output_tokens=50, completed=2)
    assert m["vsr"] == m["draft_acceptance_rate"] == pytest.approx(0.25)
    assert m["mean_accepted_length"] == pytest.approx(1.0) and m["system_efficiency"] is None
    assert spec_metrics({}, 10, 1)["vsr"] is None


def _fake_result(throughput_tokens: int, latency: float) -> BenchResult:
    reqs = [RequestResult(prompt_len=4, max_tokens=8, success=True, output_tokens=throughput_tokens // 4,
                          ttft=0.1, latency=latency + 0.01 * i) for i in range(4)]
    return BenchResult("m", "http://x", math.inf, None, 1.0, reqs, {}, {"tetrispec:spec_verified_tokens": 10.0,
                                                                        "tetrispec:spec_accepted_tokens": 5.0})


def test_plots_from_rows_without_servers(tmp_path):
    rows = [make_row(p, r, _fake_result(100 + 10 * i + r, 1.0 + i), 0.5)
            for i, p in enumerate(make_grid(["none", "fixed", "tetris", "dsd"], [1, 2, 3], [1, 2], 3))
            for r in range(2)]
    save_results(tmp_path, {"model": None, "dataset": "sharegpt", "num_requests": 4}, rows)
    assert len(read_csv(tmp_path / "results.csv")) == len(rows) == 2 * 11
    paths = plot_results(tmp_path)
    assert [p.name for p in paths] == ["throughput_vs_k.png", "vsr_vs_k.png", "latency_cdf.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["vsr"] == pytest.approx(0.5)


def test_a_server_that_dies_is_one_clear_error(tmp_path):
    sweep = Sweep(tmp_path, ["--model", str(tmp_path / "missing")], server_timeout=60, progress=False)
    with pytest.raises(SweepError, match=r"exited with code 2 .*: tetrispec serve: error: --model .*no such"):
        sweep.run(make_grid(["none"], [1], [1], 1), [])

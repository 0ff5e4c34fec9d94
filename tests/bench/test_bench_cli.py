"""`tetrispec bench` against a live `tetrispec serve` subprocess running the tiny pair."""

from __future__ import annotations

import json

import pytest

from tetrispec.bench.sweep import SERVE_CMD, ServerProcess, free_port
from tetrispec.cli import main

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Count to five, please.", "One, two, three, four, five."),
    ("What does speculative decoding do?", "It drafts tokens with a small model and verifies them."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b\n"),
    ("And the capital of Italy?", "The capital of Italy is Rome."),
    ("Hi", ""),  # no answer: below the paper's 4-token minimum, filtered out
]


@pytest.fixture(scope="module")
def live_server(tiny_pair, tmp_path_factory):
    target, draft = tiny_pair
    log = tmp_path_factory.mktemp("bench_server") / "serve.log"
    cmd = [*SERVE_CMD, "--model", target, "--speculative-model", draft, "--served-model-name", "tiny",
           "--max-num-seqs", "4", "--num-threads", "1", "--kv-cache-memory-gb", "0.02"]
    with ServerProcess(cmd, log, start_timeout=120) as url:
        yield url


@pytest.fixture
def sharegpt_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
             for i, (q, a) in enumerate(QA)]
    path.write_text(json.dumps(convs))
    return path


def test_random_burst_with_model_from_the_server(live_server, tiny_pair, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--base-url", live_server, "--dataset", "random", "--input-len", "12", "--output-len", "10",
            "--num-requests", "6", "--tokenizer", tiny_pair[0], "--ignore-eos", "--no-progress",
            "--output", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "output_throughput" in table and "tetrispec:spec_verified_tokens" in table
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["model"] == "tiny" and s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 60 and s["total_input_tokens"] == 72  # --ignore-eos: exactly max_tokens
    assert s["tetrispec:spec_verified_tokens"] > 0 and 0 <= s["spec_vsr"] <= 1
    assert len(data["requests"]) == 6 and all(r["ttft"] <= r["latency"] for r in data["requests"])
    assert "text" not in data["requests"][0] and "api_key" not in data["settings"]


def test_sharegpt_through_the_chat_endpoint_and_plain_completions(live_server, tiny_pair, sharegpt_file, capsys):
    common = ["bench", "--base-url", live_server + "/v1", "--model", "tiny", "--dataset", "sharegpt",
              "--dataset-path", str(sharegpt_file), "--num-requests", "10", "--tokenizer", tiny_pair[0],
              "--max-concurrency", "2", "--request-rate", "200", "--no-progress"]
    for template in ("model", "none"):
        assert main([*common, "--chat-template", template]) == 0
        table = capsys.readouterr().out
        completed = next(line.split()[1] for line in table.splitlines() if line.startswith("completed "))
        assert completed == str(len(QA) - 1)  # the short answer is filtered out


def test_max_output_len_caps_every_request(live_server, tiny_pair, sharegpt_file, tmp_path):
    out = tmp_path / "capped.json"
    argv = ["bench", "--base-url", live_server, "--model", "tiny", "--dataset", "sharegpt", "--dataset-path",
            str(sharegpt_file), "--tokenizer", tiny_pair[0], "--ignore-eos", "--max-output-len", "5",
            "--no-progress", "--output", str(out)]
    assert main(argv) == 0
    requests = json.loads(out.read_text())["requests"]
    assert len(requests) == len(QA) - 1 and all(r["output_tokens"] == 5 for r in requests)


def test_errors_are_one_line_with_exit_code_2(live_server, tiny_pair, tmp_path, capsys):
    common = ["bench", "--base-url", live_server, "--model", "tiny", "--tokenizer", tiny_pair[0], "--no-progress"]
    missing = tmp_path / "nope.json"
    torn = tmp_path / "torn.json"
    torn.write_text('[{"conversations": [{"from": "human", "va')
    cases = [
        ([*common, "--dataset-path", str(missing)], f"--dataset-path {missing}: no such file"),
        ([*common, "--dataset-path", str(torn)], f"{torn}: JSON is cut off before its first complete record"),
        ([*common, "--dataset", "arena"], "a path is required"),
        ([*common, "--dataset", "random", "--request-rate", "0"], "--request-rate must be > 0"),
        ([*common, "--dataset", "random", "--request-rate", "1e-300"], "hours on average"),  # was a wait of ~1e300 s
        ([*common, "--dataset", "random", "--max-output-len", "0"], "--max-output-len must be >= 1"),
        (["bench", "--base-url", f"http://127.0.0.1:{free_port()}", "--no-progress"], "cannot list models"),
        ([*common, "--dataset", "random", "--tokenizer", str(missing)], "no such file or directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("tetrispec bench: error: ") and message in err, err

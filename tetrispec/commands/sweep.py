"""`tetrispec sweep`: compare speculation methods over a k x e grid, one server per grid point."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tetrispec.commands.bench import (
    add_dataset_args,
    add_load_args,
    check_dataset_args,
    load_tokenizer,
    prepare_requests,
)


def _int_list(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of non-negative integers, got {value!r}")
    return sorted(set(out))


def _capacities(value: str) -> list[str | None]:
    out: list[str | None] = []
    for x in (x.strip() for x in value.split(",") if x.strip()):
        if x not in ("default", "auto") and not x.isdigit():
            raise argparse.ArgumentTypeError(f"capacities are default, auto or integers, got {x!r}")
        out.append(None if x == "default" else x)
    return out or [None]


def register(sub) -> None:
    p = sub.add_parser("sweep", help="benchmark none / fixed / tetris / dsd over a k x e grid")
    p.add_argument("--output-dir", default="sweep_results", help="results.csv, results.json, plots, server logs")
    p.add_argument("--plot-only", metavar="DIR", default=None, help="only redraw the plots of DIR/results.json")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", default="none,fixed,tetris,dsd", help="comma list of none, fixed, tetris, dsd")
    g.add_argument("--num-speculative-tokens", type=_int_list, default=[1, 2, 3, 4], help="k values, comma list")
    g.add_argument("--tetris-extra-proposals", type=_int_list, default=[1, 2], help="e values, comma list")
    g.add_argument("--tetris-capacity", type=_capacities, default=[None],
                   help="comma list of default (k*B), auto, or integers: one Tetris row set per value")
    g.add_argument("--dsd-max-k", type=int, default=None, help="DSD's K_max (default: the largest k)")
    g.add_argument("--repeats", type=int, default=1)
    e = p.add_argument_group("servers (the same for every grid point)")
    e.add_argument("--model", default=None, help="target checkpoint (default: the default target)")
    e.add_argument("--speculative-model", default=None, help="draft checkpoint (default: the shipped draft)")
    e.add_argument("--max-num-seqs", type=int, default=32)
    e.add_argument("--engine-seed", type=int, default=0)
    e.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    e.add_argument("--device", default=None)
    e.add_argument("--num-threads", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--kv-cache-memory-gb", type=float, default=None)
    e.add_argument("--tetris-turn-on-batch-size", type=int, default=None)
    e.add_argument("--profile-path", default=None, help="step-time profile cache for dsd and capacity auto")
    e.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for a server's /health")
    e.add_argument("--no-progress", action="store_true")
    add_dataset_args(p)
    add_load_args(p)
    p.set_defaults(func=run)


def server_args(args: argparse.Namespace) -> list[str]:
    """The engine flags every server gets; unset ones are left to serve's defaults."""
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--engine-seed", str(args.engine_seed)]
    for name in ("model", "speculative_model", "dtype", "device", "num_threads", "max_model_len",
                 "kv_cache_memory_gb", "tetris_turn_on_batch_size", "profile_path"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def setup_of(args: argparse.Namespace) -> dict:
    """The settings that make two runs comparable (the grid and repeats may grow on resume)."""
    keys = ["model", "speculative_model", "dataset", "dataset_path", "num_requests", "seed", "chat_template",
            "tokenizer", "ignore_eos", "max_output_len", "request_rate", "max_concurrency", "max_num_seqs",
            "engine_seed", "dtype", "device", "num_threads", "max_model_len", "kv_cache_memory_gb",
            "tetris_turn_on_batch_size"]
    if args.dataset == "random":
        keys += ["input_len", "output_len"]
    setup = {k: getattr(args, k) for k in keys}
    setup["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return setup


def _check(args: argparse.Namespace, methods: list[str]) -> None:
    from tetrispec.cli import CLIError
    from tetrispec.engine.llm_engine import default_draft_path

    for flag, value in (("--model", args.model), ("--speculative-model", args.speculative_model)):
        if value is not None and not Path(value).exists():
            raise CLIError(f"{flag} {value}: no such file or directory")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    speculative = [m for m in methods if m != "none"]
    if speculative and args.speculative_model is None and (args.model is not None or default_draft_path() is None):
        raise CLIError(f"methods {','.join(speculative)} need a draft: pass --speculative-model")
    if ("fixed" in methods or "tetris" in methods) and min(args.num_speculative_tokens) < 1:
        raise CLIError("--num-speculative-tokens values must be >= 1")


def run(args: argparse.Namespace) -> int:
    from tetrispec.bench.sweep import Sweep, SweepError, make_grid, plot_results
    from tetrispec.cli import CLIError

    try:
        if args.plot_only:
            for path in plot_results(Path(args.plot_only)):
                print(path)
            return 0
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        ks = args.num_speculative_tokens
        grid = make_grid(methods, ks, args.tetris_extra_proposals, args.dsd_max_k or max(ks),
                         args.tetris_capacity)
        if not grid:
            raise CLIError("--methods selects no configuration")
        _check(args, methods)
        check_dataset_args(args)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        requests = prepare_requests(args, tokenizer)
        sweep = Sweep(Path(args.output_dir), server_args(args), setup_of(args), repeats=args.repeats,
                      request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
                      ignore_eos=args.ignore_eos, server_timeout=args.server_timeout,
                      progress=not args.no_progress)
        rows = sweep.run(grid, requests, tokenizer)
        print(f"{len(rows)} rows in {Path(args.output_dir) / 'results.csv'}")
        for path in plot_results(Path(args.output_dir)):
            print(path)
    except SweepError as e:
        raise CLIError(str(e)) from None
    return 0

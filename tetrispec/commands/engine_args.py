"""Engine and speculation flags shared by generate, serve and sweep (vLLM's names)."""

from __future__ import annotations

import argparse

from tetrispec.config import DEFAULT, SPEC_METHODS


def _int_at_least(value: str, low: int, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return n


def _capacity(value: str) -> int | str:
    return value if value == "auto" else _int_at_least(value, 0, "a non-negative integer or 'auto'")


def _positive(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file (default: SmolLM2-135M)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--max-num-seqs", type=_positive, default=32)
    g.add_argument("--max-num-batched-tokens", type=_positive, default=8192)
    g.add_argument("--max-model-len", type=_positive, default=2048)
    g.add_argument("--block-size", type=_positive, default=16)
    g.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    g.add_argument("--num-kv-blocks", type=_positive, default=None)
    g.add_argument("--num-threads", type=_positive, default=None)
    g.add_argument("--engine-seed", type=int, default=0)
    g.add_argument("--chat-template", default=None,
                   help="replace the checkpoint's chat template: a file, the Jinja text, or vicuna_v1.1 / llama-3")
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculative-model", default=DEFAULT,
                   help="draft checkpoint (default: the shipped draft when --model is not given)")
    s.add_argument("--spec-method", choices=SPEC_METHODS, default=None,
                   help="default: tetris when a draft model is configured, else none")
    s.add_argument("--num-speculative-tokens", type=_positive, default=3, help="k")
    s.add_argument("--tetris-extra-proposals", type=int, default=1, help="e")
    s.add_argument("--tetris-turn-on-batch-size", type=_positive, default=2)
    s.add_argument("--tetris-capacity", type=_capacity, default=None, help="default k*B; an integer, or auto")
    s.add_argument("--dsd-max-k", type=_positive, default=6)
    s.add_argument("--spec-shadow-oracle", action="store_true",
                   help="also verify every drafted token to measure oracle efficiency (slower)")
    s.add_argument("--profile-path", default=None, help="step-time profile cache (DSD and --tetris-capacity auto)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Keywords for tetrispec.llm.build_config / LLM(...)."""
    return dict(
        model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_memory_gb, num_kv_blocks=args.num_kv_blocks,
        num_threads=args.num_threads, seed=args.engine_seed, speculative_model=args.speculative_model,
        spec_method=args.spec_method, num_speculative_tokens=args.num_speculative_tokens,
        tetris_extra_proposals=args.tetris_extra_proposals, tetris_turn_on_batch_size=args.tetris_turn_on_batch_size,
        tetris_capacity=args.tetris_capacity, dsd_max_k=args.dsd_max_k, spec_shadow_oracle=args.spec_shadow_oracle,
        profile_path=args.profile_path, chat_template=args.chat_template,
    )


def check_paths(args: argparse.Namespace) -> None:
    """Fail fast, before loading anything, on model paths that do not exist and on a --profile-path
    that cannot be a profile (read after the load, or written after minutes of profiling)."""
    import json
    from pathlib import Path

    from tetrispec.cli import CLIError

    for flag, value in (("--model", args.model), ("--speculative-model", args.speculative_model)):
        if value not in (None, DEFAULT) and not Path(value).exists():
            raise CLIError(f"{flag} {value}: no such file or directory")
    profile = Path(args.profile_path) if args.profile_path else None
    if profile is not None and profile.is_dir():
        raise CLIError(f"--profile-path {profile}: is a directory; give a file name")
    if profile is not None and profile.exists():
        try:
            json.loads(profile.read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"--profile-path {profile}: not a profile ({type(e).__name__}: {e})") from None
    elif profile is not None:
        try:
            profile.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--profile-path {profile}: cannot create {profile.parent}: {e.strerror}") from None

"""`tetrispec profile`: build (or rebuild) the step-time cost model used by DSD and auto capacity."""

from __future__ import annotations

import json

from tetrispec.commands.engine_args import add_engine_args, check_paths, engine_kwargs


def register(sub) -> None:
    p = sub.add_parser("profile", help="profile target/draft step times and cache the fitted cost model")
    p.add_argument("--force", action="store_true", help="re-profile even if a cached profile exists")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tetrispec.engine.llm_engine import LLMEngine
    from tetrispec.llm import build_config
    from tetrispec.spec.cost_model import CostModel, profile

    check_paths(args)
    kwargs = engine_kwargs(args)
    if kwargs["spec_method"] == "dsd" or kwargs["tetris_capacity"] == "auto":
        kwargs["spec_method"], kwargs["tetris_capacity"] = "tetris", None  # load without profiling on start-up
    engine = LLMEngine(build_config(**kwargs))
    path = engine.profile_path()
    if not args.force and CostModel.load_current(path, engine.device) is not None:
        print(f"profile exists: {path} (use --force to rebuild)")
    else:
        cost = profile(engine.target, engine.draft, args.max_num_seqs, max(args.dsd_max_k, engine.selector.max_depth),
                       engine.block_manager.num_blocks * args.block_size)
        cost.save(path)
        print(f"wrote {path}")
    print(json.dumps(json.loads(path.read_text()), indent=1))
    return 0

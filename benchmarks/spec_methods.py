"""Speculation methods side by side, offline, on one engine (issue 3's table).

Greedy, ShareGPT prompts (first turn in the chat template, output length from the second turn,
capped), the same prompts for every configuration. Each configuration has its own engine over
one shared copy of the weights, and all of them advance step by step in lockstep
(interleave.py), so the machine's drift lands on all of them alike. VSR, accepted tokens per
step and the throughputs come from that run; oracle efficiency from one more run per
configuration with --spec-shadow-oracle on a subset (the oracle verifies every drafted token,
which costs time but does not change what is selected or emitted).

    python benchmarks/spec_methods.py --num-prompts 200 --max-num-seqs 32 --out benchmarks/results/spec_methods_cpu.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from interleave import build_engines, calibration_fields, chat_requests, kv_blocks, lockstep, run_alone, warm_up

from tetrispec.bench.datasets import load_dataset
from tetrispec.config import EngineConfig, SpecConfig
from tetrispec.model.loader import default_target_path
from tetrispec.model.tokenizer import Tokenizer
from tetrispec.spec.cost_model import CostModel
from tetrispec.spec.stats import SpecStats


def grid(ks: list[int], es: list[int], with_auto: bool) -> dict[str, dict]:
    configs = [dict(method="none")]
    configs += [dict(method="fixed", num_speculative_tokens=k) for k in ks]
    configs += [dict(method="tetris", num_speculative_tokens=k, tetris_extra_proposals=e) for k in ks for e in es]
    configs.append(dict(method="dsd", dsd_max_k=max(ks)))
    if with_auto:
        configs.append(dict(method="tetris", num_speculative_tokens=max(ks), tetris_extra_proposals=max(es),
                            tetris_capacity="auto"))
    return {label(c): c for c in configs}


def label(cfg: dict) -> str:
    m = cfg["method"]
    if cfg.get("tetris_capacity") == "auto":
        return "tetris-auto"
    if m == "fixed":
        return f"fixed k={cfg['num_speculative_tokens']}"
    if m == "tetris":
        return f"tetris k={cfg['num_speculative_tokens']} e={cfg['tetris_extra_proposals']}"
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--speculative-model", default="default")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--oracle-prompts", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--es", default="1,2,3")
    ap.add_argument("--auto", action="store_true", help="also run --tetris-capacity auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-kv-blocks", type=int, default=800, help="KV blocks per engine at most")
    ap.add_argument("--profile-path", default=None, help="step-time profile for DSD and auto (default: the cache)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ks, es = [int(x) for x in args.ks.split(",")], [int(x) for x in args.es.split(",")]

    methods = grid(ks, es, args.auto)
    tok = Tokenizer.from_path(args.model or default_target_path())
    prompts, params = chat_requests(tok, load_dataset("sharegpt", None, tok, num_requests=args.num_prompts, seed=0),
                                    args.max_output)
    base = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        spec=SpecConfig(speculative_model=args.speculative_model, profile_path=args.profile_path))
    # KV for the 32 longest requests at once would take ~1.3 GiB for each of ~19 engines; a cap keeps them in
    # memory, at the price of a rare preemption (counted per row)
    base.num_kv_blocks = min(kv_blocks(prompts, params, base, max(ks) + max(es)), args.max_kv_blocks)
    engines = build_engines(methods, base)
    warm_up(engines, prompts[0])
    cost = CostModel.load(args.profile_path) if args.profile_path else None
    tallies, differ = lockstep(engines, prompts, params, cost)

    rows = []
    for name, cfg in methods.items():
        engine = engines[name]
        row = {"config": name, "selector": engine.selector.name, **cfg, "outputs_differing": differ,
               "preemptions": engine.scheduler.num_preemptions, **tallies[name].summary()}
        if name == "tetris-auto":
            row.update(calibration_fields(engine.selector))
        if cfg["method"] != "none" and args.oracle_prompts:
            engine.config.spec = replace(engine.config.spec, shadow_oracle=True)  # same selector, every draft verified
            engine.stats = SpecStats()
            run_alone(engine, prompts[: args.oracle_prompts], params[: args.oracle_prompts])
            row["oracle_efficiency"] = engine.stats.summary()["oracle_efficiency"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

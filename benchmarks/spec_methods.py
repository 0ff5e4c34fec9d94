"""Speculation methods side by side, offline, on one engine (issue 3's table).

Greedy, ShareGPT prompts (first turn in the chat template, output length from the second turn,
capped), the same prompts for every configuration. The configurations share one loaded engine
(only the selector is swapped) and run interleaved in --rounds rounds over disjoint halves of
the prompts (interleave.py: A B C, C B A), so the machine's drift lands on all of them alike.
VSR, accepted tokens per step and the throughputs come from those runs; oracle efficiency from
one more run per configuration with --spec-shadow-oracle on a subset (the oracle verifies every
drafted token, which costs time but does not change what is selected or emitted).

    python benchmarks/spec_methods.py --num-prompts 200 --max-num-seqs 32 --out benchmarks/results/spec_methods_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from interleave import MethodSwitch, Tally, calibration_fields, chat_requests, compare, method_spec, run_once

from tetrispec import LLM
from tetrispec.bench.datasets import load_dataset
from tetrispec.spec.cost_model import CostModel


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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--oracle-prompts", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--es", default="1,2,3")
    ap.add_argument("--auto", action="store_true", help="also run --tetris-capacity auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile-path", default=None, help="step-time profile for DSD and auto (default: the cache)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ks, es = [int(x) for x in args.ks.split(",")], [int(x) for x in args.es.split(",")]

    kw = dict(max_num_seqs=args.max_num_seqs, dtype=args.dtype, speculative_model=args.speculative_model,
              spec_method="tetris", num_speculative_tokens=max(ks), tetris_extra_proposals=max(es))
    if args.profile_path:
        kw["profile_path"] = args.profile_path
    llm = LLM(args.model, **kw)
    tok = llm.tokenizer
    reqs = load_dataset("sharegpt", None, tok, num_requests=args.num_prompts, seed=0)
    prompts, params = chat_requests(tok, reqs, args.max_output)
    n = -(-len(prompts) // args.rounds)
    rounds = [(prompts[i * n:(i + 1) * n], params[i * n:(i + 1) * n]) for i in range(args.rounds)]
    cost = CostModel.load(args.profile_path) if args.profile_path else None
    methods = grid(ks, es, args.auto)
    switch = MethodSwitch(llm)
    tallies = compare(llm, methods, rounds, cost, switch)

    rows = []
    base = llm.engine.config.spec
    for name, cfg in methods.items():
        selector = switch.selectors[name]
        row = {"config": name, "selector": selector.name, **cfg, **tallies[name].summary()}
        if name == "tetris-auto":
            row.update(calibration_fields(selector))
        if cfg["method"] != "none" and args.oracle_prompts:
            switch.use(name, method_spec(base, shadow_oracle=True, **cfg))
            oracle = Tally()
            run_once(llm, prompts[: args.oracle_prompts], params[: args.oracle_prompts], None, oracle)
            row["oracle_efficiency"] = oracle.stats.summary()["oracle_efficiency"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

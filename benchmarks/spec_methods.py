"""Speculation methods side by side, offline, in one process (issue 3's table).

Greedy, ShareGPT prompts (first turn in the chat template, output length from the second turn,
capped), the same prompts for every configuration. Throughput comes from a plain run; VSR,
accepted tokens per step and oracle efficiency from a second run with --spec-shadow-oracle on
a subset (the oracle verifies every drafted token, which costs time but does not change what
is selected or emitted).

    python benchmarks/spec_methods.py --num-prompts 200 --max-num-seqs 32 --out benchmarks/results/spec_methods_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tetrispec import LLM, SamplingParams
from tetrispec.bench.datasets import load_dataset
from tetrispec.spec.cost_model import CostModel


def grid(ks: list[int], es: list[int], with_auto: bool) -> list[dict]:
    configs = [dict(spec_method="none")]
    configs += [dict(spec_method="fixed", num_speculative_tokens=k) for k in ks]
    configs += [dict(spec_method="tetris", num_speculative_tokens=k, tetris_extra_proposals=e) for k in ks for e in es]
    configs.append(dict(spec_method="dsd", dsd_max_k=max(ks)))
    if with_auto:
        configs.append(dict(spec_method="tetris", num_speculative_tokens=max(ks), tetris_extra_proposals=max(es),
                            tetris_capacity="auto"))
    return configs


def label(cfg: dict) -> str:
    m = cfg["spec_method"]
    if cfg.get("tetris_capacity") == "auto":
        return "tetris-auto"
    if m == "fixed":
        return f"fixed k={cfg['num_speculative_tokens']}"
    if m == "tetris":
        return f"tetris k={cfg['num_speculative_tokens']} e={cfg['tetris_extra_proposals']}"
    return m


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, int, dict]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.token_ids) for o in outs), llm.spec_stats()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--speculative-model", default="default")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--oracle-prompts", type=int, default=64)
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

    probe = LLM(args.model, spec_method="none", max_num_seqs=1)
    tok = probe.tokenizer
    reqs = load_dataset("sharegpt", None, tok, num_requests=args.num_prompts, seed=0,
                        apply_template=lambda p: tok.apply_chat_template([{"role": "user", "content": p}]))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r.prompt}]), add_special_tokens=False)
               for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=min(r.output_len, args.max_output)) for r in reqs]
    del probe

    rows = []
    out_path = Path(args.out) if args.out else None
    for cfg in grid(ks, es, args.auto):
        engine_kw = dict(max_num_seqs=args.max_num_seqs, dtype=args.dtype, **cfg)
        if cfg["spec_method"] != "none":
            engine_kw["speculative_model"] = args.speculative_model
        if args.profile_path:
            engine_kw["profile_path"] = args.profile_path
        llm = LLM(args.model, **engine_kw)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        llm.engine.stats = type(llm.engine.stats)()
        llm.engine.step_trace = []
        elapsed, tokens, stats = run(llm, prompts, params)
        row = {"config": label(cfg), **cfg, "seconds": round(elapsed, 2), "output_tokens": tokens,
               "tokens_per_s": round(tokens / elapsed, 2), "vsr": stats["verification_success_rate"],
               "draft_acceptance_rate": stats["draft_acceptance_rate"],
               "accepted_per_step": stats["accepted_tokens"] / max(1, stats["num_steps"]),
               "mean_accepted_length": stats["mean_accepted_length"], "system_efficiency": stats["system_efficiency"],
               "verified_tokens": stats["verified_tokens"], "steps": stats["num_steps"]}
        if "calibration" in stats:
            row["calibration_ece"] = stats["calibration"]["ece"]
        cost = CostModel.load(args.profile_path) if args.profile_path else None
        if cost is not None:  # decode steps timed by the profile instead of the clock (no machine noise)
            row["modelled_decode_tokens_per_s"] = stats["emitted_tokens"] / cost.replay(llm.engine.step_trace)
        if cfg["spec_method"] != "none" and args.oracle_prompts:
            oracle = LLM(args.model, spec_shadow_oracle=True, **engine_kw)
            if "calibration" in stats:  # same learned state as the measured run
                oracle.engine.selector.estimator = llm.engine.selector.estimator
            _, _, ostats = run(oracle, prompts[: args.oracle_prompts], params[: args.oracle_prompts])
            row["oracle_efficiency"] = ostats["oracle_efficiency"]
            del oracle
        del llm
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

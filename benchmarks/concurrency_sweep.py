"""Throughput against concurrency for each speculation method (issue 7's table and plot).

Offline, in one process: for each max-num-seqs in the list, one engine (default pair) runs
every method on the same ShareGPT prompts (greedy, chat template, output length from the
dataset capped at --max-output), interleaved in rounds (see interleave.py: A B C, C B A, so
the machine's drift lands on every method alike). Each round has --prompts-per-seq x
concurrency prompts (at least --min-prompts); rounds use different prompts. The auto-capacity
selector keeps its calibration across rounds and concurrencies (persisted beside the cost
profile, as in serving).

    python benchmarks/concurrency_sweep.py --concurrency 1,2,4,8,16,32 --out benchmarks/results/concurrency_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from interleave import MethodSwitch, calibration_fields, chat_requests, compare, pooled_calibration

from tetrispec import LLM
from tetrispec.bench.datasets import load_dataset
from tetrispec.spec.cost_model import CostModel

METHODS = {
    "none": dict(method="none"),
    "fixed-k1": dict(method="fixed", num_speculative_tokens=1),
    "fixed-k2": dict(method="fixed", num_speculative_tokens=2),
    "fixed-k3": dict(method="fixed", num_speculative_tokens=3),
    "fixed-k4": dict(method="fixed", num_speculative_tokens=4),
    "tetris-k1-e1": dict(method="tetris", num_speculative_tokens=1, tetris_extra_proposals=1),
    "tetris-k2-e1": dict(method="tetris", num_speculative_tokens=2, tetris_extra_proposals=1),
    "dsd": dict(method="dsd", dsd_max_k=4),
    "tetris-auto": dict(method="tetris", num_speculative_tokens=3, tetris_extra_proposals=1, tetris_capacity="auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--prompts-per-seq", type=int, default=2, help="prompts per round = this x concurrency")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--profile", default="benchmarks/results/profiles/default-pair-cpu.json",
                    help="step-time profile shared by every run (build it first at the largest concurrency)")
    ap.add_argument("--out", default="benchmarks/results/concurrency_cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["concurrency"] for r in rows}

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    need = args.rounds * max(args.min_prompts, args.prompts_per_seq * max(concurrencies))
    cost = CostModel.load(args.profile)
    if cost is None:
        raise SystemExit(f"{args.profile}: no current step-time profile; build it with `tetrispec profile`")
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    for c in concurrencies:
        if c in done:
            continue
        llm = LLM(spec_method="tetris", tetris_capacity="auto", num_speculative_tokens=3, tetris_extra_proposals=1,
                  max_num_seqs=c, profile_path=args.profile)
        tok = llm.tokenizer
        reqs = load_dataset("sharegpt", None, tok, num_requests=need, seed=0)
        prompts, params = chat_requests(tok, reqs, args.max_output)
        n = max(args.min_prompts, args.prompts_per_seq * c)
        rounds = [(prompts[i * n:(i + 1) * n], params[i * n:(i + 1) * n]) for i in range(args.rounds)]
        switch = MethodSwitch(llm)
        tallies = compare(llm, methods, rounds, cost, switch)
        for name, tally in tallies.items():
            row = {"method": name, "selector": switch.selectors[name].name, "concurrency": c,
                   "prompts": n * args.rounds, "rounds": args.rounds, **tally.summary()}
            if name == "tetris-auto":
                row.update(calibration_fields(switch.selectors[name]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        results_path.write_text(json.dumps(rows, indent=1))
        del llm
    pooled = pooled_calibration(rows)
    if pooled is not None:
        (out / "calibration.json").write_text(json.dumps(pooled, indent=1))
        print(f"auto calibration over the sweep: ECE {pooled['ece']} (chance floor {pooled['ece_floor']}) "
              f"on {pooled['scored']} scored outcomes", flush=True)
    plot(rows, out / "throughput_vs_concurrency.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("decode_tokens_per_s", "measured decode tokens/s"),
              ("modelled_decode_tokens_per_s", "modelled decode tokens/s (profiled step times)"),
              ("tokens_per_s", "measured output tokens/s (prefill included)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["concurrency"], r[key]) for r in rows if r["method"] == name and key in r)
            style = "-o" if name in ("tetris-auto", "none") else "--."
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (max-num-seqs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Default pair on CPU (2 cores), greedy ShareGPT, methods interleaved")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

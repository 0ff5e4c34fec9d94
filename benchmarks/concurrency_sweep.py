"""Throughput against concurrency for each speculation method (issue 7's table and plot).

Offline, in one process: for each max-num-seqs in the list, one engine per method (default
pair, one copy of the weights) runs the same ShareGPT prompts (greedy, chat template, output
length from the dataset capped at --max-output), all engines interleaved step by step (see
interleave.py), --prompts-per-seq x concurrency prompts (at least --min-prompts). The
auto-capacity selector keeps its calibration across concurrencies (persisted beside the cost
profile, as in serving). Every method's steps, as timed, go to steps_c<concurrency>.json beside the
results (interleave.Tally.timeline and the engine's step trace): where a host's slow spell fell.

    python benchmarks/concurrency_sweep.py --concurrency 1,2,4,8,16,32 --out benchmarks/results/concurrency_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from interleave import (
    build_engines,
    calibration_fields,
    chat_requests,
    kv_blocks,
    lockstep,
    pooled_calibration,
    warm_up,
)

from tetrispec.bench.datasets import load_dataset
from tetrispec.config import EngineConfig, SpecConfig
from tetrispec.model.loader import default_target_path
from tetrispec.model.tokenizer import Tokenizer
from tetrispec.spec.cost_model import CostModel, StepRecord
from tetrispec.spec.selectors import make_selector

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
    ap.add_argument("--min-prompts", type=int, default=20)
    ap.add_argument("--prompts-per-seq", type=int, default=4,
                    help="prompts = this x concurrency (at least --min-prompts)")
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
    cost = CostModel.load_current(args.profile, EngineConfig().torch_device)
    if cost is None:  # the engines would re-profile, and the modelled numbers would use the stale file
        raise SystemExit(f"{args.profile}: no current step-time profile for this host; run `tetrispec profile`")
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    depth = max(make_selector(SpecConfig(**m), has_draft=True).max_depth for m in methods.values())
    tok = Tokenizer.from_path(default_target_path())
    for c in concurrencies:
        if c in done:
            continue
        n = max(args.min_prompts, args.prompts_per_seq * c)
        base = EngineConfig(spec=SpecConfig(profile_path=args.profile), max_num_seqs=c)
        reqs = load_dataset("sharegpt", None, tok, num_requests=n, seed=0)
        prompts, params = chat_requests(tok, reqs, args.max_output)
        base.num_kv_blocks = kv_blocks(prompts, params, base, depth)
        engines = build_engines(methods, base)
        warm_up(engines, prompts[0])
        tallies, differ = lockstep(engines, prompts, params, cost)
        for name, tally in tallies.items():
            selector = engines[name].selector
            row = {"method": name, "selector": selector.name, "concurrency": c,
                   "prompts": n, "outputs_differing": differ, "preemptions": engines[name].scheduler.num_preemptions,
                   **tally.summary()}
            if name == "tetris-auto":
                row.update(calibration_fields(selector))
            rows.append(row)
            print(json.dumps(row), flush=True)
        results_path.write_text(json.dumps(rows, indent=1))
        (out / f"steps_c{c}.json").write_text(json.dumps(
            {name: {"timeline": tally.timeline, "fields": StepRecord._fields, "trace": engines[name].step_trace}
             for name, tally in tallies.items()}))
        del engines
    pooled = pooled_calibration(rows)
    if pooled is not None:
        (out / "calibration.json").write_text(json.dumps(pooled, indent=1))
        print(f"auto calibration over the sweep: ECE {pooled['ece']} (chance floor {pooled['ece_floor']}) "
              f"on {pooled['scored']} scored outcomes", flush=True)
    plot(rows, out / "throughput_vs_concurrency.png", host_name(EngineConfig().torch_device))


def host_name(device) -> str:
    """What the plot's title says ran the sweep: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def plot(rows: list[dict], path: Path, host: str) -> None:
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
    fig.suptitle(f"Default pair on {host}, greedy ShareGPT, methods interleaved")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

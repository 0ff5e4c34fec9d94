"""Throughput against concurrency for each speculation method (issue 7's table and plot).

Offline, in one process: for each max-num-seqs in the list, every method decodes the same
ShareGPT prompts (greedy, chat template, output length from the dataset capped at
--max-output), with as many prompts as keep the batch full for a while (--prompts-per-seq x
concurrency, at least --min-prompts). The auto-capacity selector keeps its calibration across concurrencies
(it is persisted beside the cost profile, as in serving).

    python benchmarks/concurrency_sweep.py --concurrency 1,2,4,8,16,32 --out benchmarks/results/concurrency_cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tetrispec import LLM, SamplingParams
from tetrispec.bench.datasets import load_dataset
from tetrispec.spec.cost_model import CostModel

METHODS = {
    "none": dict(spec_method="none"),
    "fixed-k1": dict(spec_method="fixed", num_speculative_tokens=1),
    "fixed-k2": dict(spec_method="fixed", num_speculative_tokens=2),
    "fixed-k3": dict(spec_method="fixed", num_speculative_tokens=3),
    "fixed-k4": dict(spec_method="fixed", num_speculative_tokens=4),
    "tetris-k2-e1": dict(spec_method="tetris", num_speculative_tokens=2, tetris_extra_proposals=1),
    "tetris-k1-e1": dict(spec_method="tetris", num_speculative_tokens=1, tetris_extra_proposals=1),
    "dsd": dict(spec_method="dsd", dsd_max_k=4),
    "tetris-auto": dict(spec_method="tetris", num_speculative_tokens=3, tetris_extra_proposals=1,
                        tetris_capacity="auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--prompts-per-seq", type=int, default=4, help="prompts = this x concurrency (at least min)")
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument("--profile", default="benchmarks/results/profiles/default-pair-cpu.json",
                    help="step-time profile shared by every run (build it first at the largest concurrency)")
    ap.add_argument("--out", default="benchmarks/results/concurrency_cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["method"], r["concurrency"]) for r in rows}

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    probe = LLM(spec_method="none", max_num_seqs=1)
    tok = probe.tokenizer
    reqs = load_dataset("sharegpt", None, tok, num_requests=4 * max(concurrencies) + args.min_prompts, seed=0)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r.prompt}]), add_special_tokens=False)
               for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=min(r.output_len, args.max_output)) for r in reqs]
    del probe
    cost = CostModel.load(args.profile)
    if cost is None:
        raise SystemExit(f"{args.profile}: no current step-time profile; build it with `tetrispec profile`")
    for c in concurrencies:
        n = max(args.min_prompts, args.prompts_per_seq * c)
        for name in args.methods.split(","):
            if (name, c) in done:
                continue
            kw = dict(METHODS[name], max_num_seqs=c, profile_path=args.profile)
            llm = LLM(**kw)
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
            llm.engine.stats = type(llm.engine.stats)()
            llm.engine.step_trace = []
            start = time.perf_counter()
            outs = llm.generate(prompts[:n], params[:n], use_tqdm=False)
            elapsed = time.perf_counter() - start
            stats = llm.spec_stats()
            row = {"method": name, "concurrency": c, "prompts": n, "seconds": round(elapsed, 2),
                   "output_tokens": sum(len(o.token_ids) for o in outs),
                   "tokens_per_s": round(sum(len(o.token_ids) for o in outs) / elapsed, 2),
                   "vsr": stats["verification_success_rate"], "verified_tokens": stats["verified_tokens"],
                   "accepted_tokens": stats["accepted_tokens"], "steps": stats["num_steps"],
                   # decode steps timed by the profile instead of the clock (no machine noise)
                   "modelled_decode_tokens_per_s": round(
                       stats["emitted_tokens"] / cost.replay(llm.engine.step_trace), 2)}
            if "calibration" in stats:
                row["calibration_ece"] = stats["calibration"]["ece"]
                row["calibration_observations"] = stats["calibration"]["observations"]
            rows.append(row)
            results_path.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)
            del llm
    plot(rows, out / "throughput_vs_concurrency.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_per_s", "measured output tokens/s"),
              ("modelled_decode_tokens_per_s", "modelled decode tokens/s (profiled step times)")]
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
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
    fig.suptitle("Default pair on CPU (2 cores), greedy ShareGPT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""One target forward at batch 32 with the PyTorch attention path and with the CPU kernel.

The PyTorch path gathers each sequence's KV blocks into a padded buffer per layer (bucketed by
context) and runs SDPA; the kernel (tetrispec/model/csrc/paged_attention.cpp) reads the paged
cache in place. Decode (one query token per sequence) and verify (one to three per sequence,
as Tetris sends) on a uniform and a mixed set of contexts; the two paths alternate within each
repeat so the machine's drift lands on both; median of --repeats, in one process.

    python benchmarks/cpu_attention_kernel.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from context_buckets import items_for

from tetrispec import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runner = LLM(spec_method="none", max_num_seqs=32, dtype=args.dtype).engine.target
    if not runner.use_kernel:
        raise SystemExit("the CPU kernel did not build on this machine")
    rng = random.Random(0)
    contexts = {
        "uniform 32 x 300": [300] * 32,
        "ShareGPT-like mix": [rng.choice([40, 80, 150, 250, 400, 700, 1000]) + rng.randint(0, 30) for _ in range(32)],
    }
    rows = []
    for ctx_name, ctx in contexts.items():
        for q_name, q_lens in (("decode", [1] * 32), ("verify 1-3", [rng.choice([1, 2, 3]) for _ in range(32)])):
            items = items_for(ctx, runner.block_size, q_lens)
            times = {False: [], True: []}
            for r in range(args.repeats + 2):
                for kernel in (False, True) if r % 2 == 0 else (True, False):
                    runner.use_kernel = kernel
                    start = time.perf_counter()
                    runner.forward_greedy(items, "all")
                    if r >= 2:  # two warm-up rounds
                        times[kernel].append(time.perf_counter() - start)
            torch_ms, kernel_ms = (statistics.median(times[k]) * 1e3 for k in (False, True))
            row = {"contexts": ctx_name, "queries": q_name, "tokens": sum(q_lens), "torch_ms": round(torch_ms, 1),
                   "kernel_ms": round(kernel_ms, 1), "speedup": round(torch_ms / kernel_ms, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    runner.use_kernel = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

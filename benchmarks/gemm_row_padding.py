"""Target forwards with and without the short-matmul row padding (tetrispec/model/gemm_rows.py).

One engine, the default target, float32; each shape is timed with the measured plans and with
plans switched off, alternating, median of --repeats. Shapes at context 300: decodes and uniform verifies
at batch 1, 2, 4 and 8, and ragged verifies of 12 and 13 tokens at batch 8.

    python benchmarks/gemm_row_padding.py --repeats 15
"""

from __future__ import annotations

import argparse
import json
import time

from tetrispec import LLM
from tetrispec.model.gemm_rows import Linear
from tetrispec.model.model_runner import ForwardItem

SHAPES = {"1 x 1 decode": [1], "1 x 2 verify": [2], "1 x 4 verify": [4], "2 x 1 decode": [1] * 2,
          "2 x 3 verify": [3] * 2, "4 x 1 decode": [1] * 4, "4 x 2 verify": [2] * 4, "8 x 1 decode": [1] * 8,
          "8 x 2 verify": [2] * 8,
          "ragged verify, 12 tokens": [2, 1, 2, 1, 2, 1, 2, 1], "ragged verify, 13 tokens": [2, 1, 2, 2, 1, 2, 2, 1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    runner = LLM(spec_method="none", max_num_seqs=8).engine.target
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    plans = [m.row_plan for m in linears]
    blocks = -(-(args.context + 4) // runner.block_size)
    batches = {name: [ForwardItem([1] * q, args.context, list(range(i * blocks, (i + 1) * blocks)))
                      for i, q in enumerate(lens)] for name, lens in SHAPES.items()}
    times = {(name, padded): [] for name in SHAPES for padded in (True, False)}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, items in batches.items():
            for padded in (True, False):
                for m, plan in zip(linears, plans):
                    m.row_plan = plan if padded else None
                start = time.perf_counter()
                runner.forward_greedy(items, "all", logprobs=False)
                times[(name, padded)].append(time.perf_counter() - start)
    rows = []
    for name in SHAPES:
        off, on = (sorted(times[(name, p)][1:])[args.repeats // 2] * 1e3 for p in (False, True))
        rows.append({"shape": name, "tokens": sum(SHAPES[name]), "plain_ms": round(off, 1), "padded_ms": round(on, 1)})
        print(f"{name:26s} {off:7.1f} ms -> {on:7.1f} ms ({off / on:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

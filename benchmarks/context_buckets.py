"""One decode step at batch 32 with and without context buckets (attention.partition_by_context).

Mixed contexts are what serving sees: with one gather padded to the longest context, a single
long conversation makes every short one in the batch pay for its keys. Times the target's
decode forward (greedy head) on three context mixes for several bucket call costs ("off" is
one bucket, i.e. no bucketing), median of 8, in one process.

    python benchmarks/context_buckets.py --dtype float32
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import tetrispec.model.attention as attention
from tetrispec import LLM
from tetrispec.model.model_runner import ForwardItem

OFF = 10**9


def items_for(contexts: list[int], block_size: int, query_lens: list[int] | None = None) -> list[ForwardItem]:
    """One sequence per cached context, with query_lens[i] new tokens (1 each by default) on disjoint blocks."""
    items, next_block = [], 1
    for c, q in zip(contexts, query_lens or [1] * len(contexts)):
        n = -(-(c + q) // block_size)
        items.append(ForwardItem([5] * q, c, list(range(next_block, next_block + n))))
        next_block += n
    return items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    runner = LLM(spec_method="none", max_num_seqs=32, dtype=args.dtype).engine.target
    runner.use_kernel = False  # buckets belong to the PyTorch path; the CPU kernel has no padding to cut
    rng = random.Random(0)
    cases = {
        "uniform 32 x 300": [300] * 32,
        "31 x 200 + 1 x 1000": [200] * 31 + [1000],
        "ShareGPT-like mix": [rng.choice([40, 80, 150, 250, 400, 700, 1000]) + rng.randint(0, 30) for _ in range(32)],
    }
    for name, contexts in cases.items():
        items = items_for(contexts, runner.block_size)
        cells = []
        for call_cost in (OFF, 512, 2048):
            attention.CALL_COST_KEYS = call_cost
            for _ in range(2):
                runner.forward_greedy(items)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                runner.forward_greedy(items)
                times.append(time.perf_counter() - start)
            label = "off" if call_cost == OFF else str(call_cost)
            cells.append(f"{label}: {statistics.median(times) * 1e3:.1f} ms")
        print(f"{name:22s} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()

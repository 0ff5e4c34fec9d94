"""Target forward times with torch's large CPU allocations on transparent huge pages, and without.

Each setting runs in its own process (torch reads THP_MEM_ALLOC_ENABLE once, at its first large
allocation); the processes alternate, --rounds times, and the table shows the median per shape.
A shape is one target forward of the default model: B sequences at context --context, plain
(one token each) or a verify (two each).

    python benchmarks/huge_pages.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(1, 1), (1, 2), (8, 1), (8, 2), (32, 1), (32, 2)]  # (batch, query tokens per sequence)


def measure(context: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per shape, in this process, plus the huge-page share of its memory."""
    import torch

    from tetrispec.config import EngineConfig, SpecConfig
    from tetrispec.engine.llm_engine import LLMEngine
    from tetrispec.spec.cost_model import _time_forward

    engine = LLMEngine(EngineConfig(max_num_seqs=32, num_kv_blocks=32 * (-(-(context + 8) // 16)) + 8,
                                    spec=SpecConfig(method="none")))
    out = {f"B{b} q{q}": 1000 * _time_forward(engine.target, b, context, q, repeats) for b, q in SHAPES}
    rollup = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup") if ":" in line)
    out["huge_share"] = int(rollup["AnonHugePages"].split()[0]) / max(int(rollup["Anonymous"].split()[0]), 1)
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.context, args.repeats)))
        return
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for setting in runs:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
            done = subprocess.run([sys.executable, __file__, "--child", "--context", str(args.context),
                                   "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"target forward, context {args.context}, median of {args.rounds} processes each (ms)")
    print(f"{'shape':8s} {'4 KiB pages':>12s} {'huge pages':>11s} {'change':>7s}")
    for b, q in SHAPES:
        key = f"B{b} q{q}"
        off, on = (statistics.median(r[key] for r in runs[s]) for s in ("0", "1"))
        print(f"{key:8s} {off:12.1f} {on:11.1f} {100 * (on / off - 1):+6.1f}%")
    share = [100 * statistics.median(r["huge_share"] for r in runs[s]) for s in ("0", "1")]
    print(f"anonymous memory on huge pages: off {share[0]:.0f}%, on {share[1]:.0f}%")


if __name__ == "__main__":
    main()

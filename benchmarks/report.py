"""Markdown tables for the README from the JSON files under benchmarks/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

R = Path(__file__).parent / "results"


def fmt(x, digits=3):
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def throughput() -> None:
    print("| dtype | batch | tetrispec tok/s | transformers tok/s | speedup |\n|---|---:|---:|---:|---:|")
    for dt in ("float32", "bfloat16"):
        p = R / f"throughput_{dt}.json"
        if p.exists():
            for r in json.loads(p.read_text())["rows"]:
                print(f"| {dt} | {r['batch']} | {r['tetrispec_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | "
                      f"{r['speedup']:.2f}x |")


def spec_methods() -> None:
    p = R / "spec_methods_cpu.json"
    if not p.exists():
        return
    rows = json.loads(p.read_text())["rows"]
    print("| config | tok/s | decode tok/s | modelled decode tok/s | VSR | accepted / step | mean accepted len "
          "| system eff. | verified | oracle eff. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tokens_per_s']:.1f} | {fmt(r.get('decode_tokens_per_s'), 1)} | "
              f"{fmt(r.get('modelled_decode_tokens_per_s'), 1)} | "
              f"{fmt(r['vsr'])} | {r['accepted_per_step']:.2f} | {fmt(r['mean_accepted_length'])} | "
              f"{fmt(r['system_efficiency'])} | {r['verified_tokens']} | {fmt(r.get('oracle_efficiency'))} |")


def concurrency(folder: str = "concurrency_cpu") -> None:
    p = R / folder / "results.json"
    if not p.exists():
        return
    rows = json.loads(p.read_text())
    add_stall_clipped(rows, R / folder)
    for key, title in (("decode_tokens_per_s", "measured decode tokens/s (decode steps' wall time)"),
                       ("clipped_decode_tokens_per_s", "measured decode tokens/s, stalls clipped (interleave."
                        "stall_clipped_seconds, from the saved steps)"),
                       ("modelled_decode_tokens_per_s", "modelled decode tokens/s (profiled step times)"),
                       ("tokens_per_s", "measured output tokens/s (prefill included)")):
        if not any(key in r for r in rows):
            continue
        print(f"\n{title}\n")
        grid_table(rows, key)
    auto = [r for r in rows if r["method"] == "tetris-auto"]
    if auto:
        print("\nauto capacity: VSR " + ", ".join(f"c={r['concurrency']}: {fmt(r['vsr'], 2)}" for r in auto)
              + "; verified tokens " + ", ".join(str(r["verified_tokens"]) for r in auto)
              + "; ECE (chance floor, outcomes scored) " + ", ".join(
                  f"{fmt(r.get('calibration_ece'), 3)} ({fmt(r.get('calibration_ece_floor'), 3)}, "
                  f"{r.get('calibration_scored')})" for r in auto))
    pooled = R / folder / "calibration.json"
    if pooled.exists():
        cal = json.loads(pooled.read_text())
        print(f"\npooled over the sweep: ECE {cal['ece']} (chance floor {cal['ece_floor']}) "
              f"on {cal['scored']} outcomes")


def add_stall_clipped(rows: list[dict], folder: Path) -> None:
    """clipped_decode_tokens_per_s for every row whose concurrency's steps were saved (steps_c<C>.json).
    interleave (beside this script, so on the path) brings in the engine: imported here, only when needed."""
    from interleave import stall_clipped_seconds

    from tetrispec.spec.cost_model import StepRecord

    for c in {r["concurrency"] for r in rows}:
        steps = folder / f"steps_c{c}.json"
        if not steps.exists():
            continue
        runs = json.loads(steps.read_text())
        for r in rows:
            if r["concurrency"] == c and r["method"] in runs:
                trace = [StepRecord(*x) for x in runs[r["method"]]["trace"]]
                wall = sum(x.seconds for x in trace)
                r["clipped_decode_tokens_per_s"] = r["decode_tokens_per_s"] * wall / stall_clipped_seconds(trace)


def gaps(folders: str, key: str = "decode_tokens_per_s") -> None:
    """Each method against the best of the others, per concurrency, over several sweeps (folders
    joined by commas): mean, lowest and highest gap in percent, and in how many sweeps it was at
    least the best. A sweep's cell is noisy at the 1% level (engines doing identical steps differ by
    that much), so one sweep cannot separate methods closer than that; several can."""
    runs = [json.loads((R / f / "results.json").read_text()) for f in folders.split(",")]
    for f, rows in zip(folders.split(","), runs):
        add_stall_clipped(rows, R / f)
    methods = list(dict.fromkeys(r["method"] for r in runs[0]))
    cs = sorted({r["concurrency"] for r in runs[0]})
    print(f"{len(runs)} sweeps ({folders}); {key}: gap to the best other method, mean [lowest, highest] %, "
          "sweeps at least level\n")
    print("| method | " + " | ".join(f"c={c}" for c in cs) + " | worst cell, mean over sweeps |\n|---|"
          + "---:|" * (len(cs) + 1))
    for m in methods:
        cells, worst = [], []
        per_run = []
        for rows in runs:
            gap = {}
            for c in cs:
                at = {r["method"]: r[key] for r in rows if r["concurrency"] == c}
                if m in at and len(at) > 1:
                    gap[c] = 100 * (at[m] / max(v for n, v in at.items() if n != m) - 1)
            per_run.append(gap)
            if gap:
                worst.append(min(gap.values()))
        for c in cs:
            g = [run[c] for run in per_run if c in run]
            level = sum(x >= 0 for x in g)
            cells.append("–" if not g else f"{sum(g) / len(g):+.1f} [{min(g):+.1f}, {max(g):+.1f}] {level}/{len(g)}")
        print(f"| {m} | " + " | ".join(cells) + f" | {sum(worst) / max(len(worst), 1):+.1f} |")


def grid_table(rows: list[dict], key: str) -> None:
    """Methods x concurrencies, the best of each column in bold."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cs = sorted({r["concurrency"] for r in rows})
    print("| method | " + " | ".join(f"c={c}" for c in cs) + " |\n|---|" + "---:|" * len(cs))
    best = {c: max(r.get(key, 0) for r in rows if r["concurrency"] == c) for c in cs}
    for m in methods:
        cells = []
        for c in cs:
            v = [r[key] for r in rows if r["method"] == m and r["concurrency"] == c and key in r]
            cells.append("–" if not v else (f"**{v[0]:.1f}**" if v[0] == best[c] else f"{v[0]:.1f}"))
        print(f"| {m} | " + " | ".join(cells) + " |")


def sweep() -> None:
    p = R / "sweep_cpu_small" / "results.json"
    if not p.exists():
        return
    data = json.loads(p.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    print("| config | tok/s | mean TTFT ms | median TPOT ms | p99 e2e ms | VSR | draft acceptance | mean accepted len "
          "| system eff. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = r.get("config") or r.get("label") or r.get("method")
        print(f"| {name} | {fmt(r.get('output_throughput'), 1)} | {fmt(r.get('mean_ttft_ms'), 0)} | "
              f"{fmt(r.get('median_tpot_ms'), 1)} | {fmt(r.get('p99_e2el_ms'), 0)} | {fmt(r.get('vsr'))} | "
              f"{fmt(r.get('draft_acceptance_rate'))} | {fmt(r.get('mean_accepted_length'))} | "
              f"{fmt(r.get('system_efficiency'))} |")


if __name__ == "__main__":
    # `report.py concurrency:concurrency_cuda_h200` reads another results folder;
    # `report.py gaps:concurrency_cpu_run_u,concurrency_cpu_run_v` pools sweeps
    for name in sys.argv[1:] or ["throughput", "spec_methods", "concurrency", "sweep"]:
        print(f"\n### {name}\n")
        table, _, folder = name.partition(":")
        globals()[table](*([folder] if folder else []))

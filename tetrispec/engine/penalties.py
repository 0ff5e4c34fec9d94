"""Logit bias, min_tokens and presence, frequency and repetition penalties: logits adjusted per request.

For a token t with count c_t in the output so far (OpenAI's logit bias b_t, presence and frequency
penalties, vLLM's and Hugging Face's repetition penalty, applied in vLLM's order):
  logit_t += b_t
  if t is in the prompt or the output:  logit_t = logit_t / r if logit_t > 0 else logit_t * r
  logit_t -= frequency_penalty * c_t + presence_penalty * [c_t > 0]
  while the output is shorter than min_tokens:  logit_t = -inf for EOS and the stop token ids
The result feeds temperature, min_p, top-k and top-p as raw logits would (greedy takes its argmax).

Row r of a batch follows its request's output plus `drafts[r]`: in a verify forward, row j of a
request comes after its first j drafts, and plain decoding would have counted them by then. Leaving
them out would make speculation lossy (a draft could repeat a token the penalty should have held
back); the tests check exactly that. Rows of requests without adjustments are left untouched, and a
batch with none returns its logits as they are, so the default path costs nothing.
"""

from __future__ import annotations

import torch

from tetrispec.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]] | None = None) -> torch.Tensor:
    """logits [N, V]; seqs[r] owns row r (a request may own several rows); drafts[r]: tokens that
    row follows beyond the request's output (None: none). Returns new logits [N, V] when a row is
    adjusted (the input stays as it was: logprobs are reported raw), else the input itself."""
    rows = [r for r, s in enumerate(seqs) if s.adjusts_logits]
    if not rows:
        return logits
    V, device = logits.shape[1], logits.device
    params = [seqs[r].params for r in rows]
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index)  # [n, V]
    biased = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if biased:
        cells = torch.tensor([i * V + t for i, bias in biased for t in bias], device=device)
        values = torch.tensor([v for _, bias in biased for v in bias.values()], dtype=sub.dtype, device=device)
        sub = sub.flatten().index_add(0, cells, values).view(len(rows), V)
    held = [(i, seqs[r].stop_ids) for i, r in enumerate(rows)
            if seqs[r].num_output_tokens + (len(drafts[r]) if drafts else 0) < seqs[r].params.min_tokens]
    if held:
        cells = torch.tensor([i * V + t for i, ids in held for t in ids if t < V], dtype=torch.long, device=device)
        sub = sub.flatten().index_fill(0, cells, float("-inf")).view(len(rows), V)
    if not any(p.has_penalties for p in params):
        return logits.index_copy(0, index, sub)
    owner_of: dict[int, int] = {}  # id(seq) -> its row in the per-request tensors below
    for r in rows:
        owner_of.setdefault(id(seqs[r]), len(owner_of))
    owned = list({id(seqs[r]): seqs[r] for r in rows}.values())  # in owner_of's order
    owner = torch.tensor([owner_of[id(seqs[r])] for r in rows], device=device)
    counts = _bincount([s.output_token_ids for s in owned], V, device)[owner]  # [n, V] output so far
    if drafts is not None and any(drafts[r] for r in rows):
        counts += _bincount([drafts[r] for r in rows], V, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_seen = _bincount([s.prompt_token_ids if s.params.repetition_penalty != 1.0 else [] for s in owned],
                                V, device)[owner] > 0
        r = _column([p.repetition_penalty for p in params], sub)
        seen = prompt_seen | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    freq = _column([p.frequency_penalty for p in params], sub)
    presence = _column([p.presence_penalty for p in params], sub)
    sub = sub - freq * counts - presence * (counts > 0)
    return logits.index_copy(0, index, sub)


def _bincount(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token in each list: [len(token_lists), vocab] float32 (exact up to 2**24)."""
    lengths = torch.tensor([len(ids) for ids in token_lists], device=device)
    flat = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long, device=device)
    cells = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths) * vocab + flat
    return torch.bincount(cells, minlength=len(token_lists) * vocab).view(len(token_lists), vocab).float()


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]

"""Logits -> per-request sampling distributions, and sampling with per-request randomness.

Greedy rows become one-hot distributions of the argmax. That lets greedy and random
requests share one rejection-sampling rule: with one-hot p and q, "accept with probability
min(1, p/q)" is "accept iff the draft equals the target's argmax", and the residual
max(0, p - q) is the target's argmax itself.
"""

from __future__ import annotations

import torch

from tetrispec.sampling_params import SamplingParams


def logits_to_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [N, V] (float32), one SamplingParams per row -> probabilities [N, V]."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    greedy = temps == 0
    probs = torch.empty_like(logits)
    if greedy.any():
        rows = greedy.nonzero(as_tuple=True)[0]
        probs[rows] = 0.0
        probs[rows, logits[rows].argmax(-1)] = 1.0
    if greedy.all():
        return probs
    rows = (~greedy).nonzero(as_tuple=True)[0]
    sub = [params[i] for i in rows.tolist()]
    scaled = logits[rows] / temps[rows, None]
    min_p = [p.min_p for p in sub]
    if any(min_p):  # vLLM's order: after temperature, before top-k and top-p
        scaled = _min_p(scaled, min_p)
    top_k = [p.top_k if p.top_k > 0 else 0 for p in sub]
    top_p = [p.top_p for p in sub]
    if any(top_k) or any(p < 1.0 for p in top_p):
        scaled = _truncate(scaled, top_k, top_p)
    probs[rows] = torch.softmax(scaled, dim=-1)
    return probs


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the most likely token's.

    In log space that is logit < max logit + log(min_p): no softmax needed, and min_p = 0 (log -inf)
    masks nothing. The most likely token always stays.
    """
    floor = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).log()[:, None]
    return logits.masked_fill(logits < logits.max(-1, keepdim=True).values + floor, float("-inf"))


def _truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus (ties at the edge kept)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([k if k > 0 else V for k in top_k], device=logits.device)
    kth = sorted_logits.gather(1, (ks.clamp(max=V) - 1)[:, None])
    cut = logits < kth
    ps = torch.tensor(top_p, dtype=logits.dtype, device=logits.device)
    if (ps < 1).any():
        sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), -1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= ps[:, None]  # the token that crosses top_p is kept
        drop_sorted[:, 0] = False  # and the most likely one always, even where top_p rounds to 0
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        cut |= drop
    return logits.masked_fill(cut, float("-inf"))


def draw_uniforms(seqs: list, n: int, default: torch.Generator, device: torch.device) -> torch.Tensor:
    """[B, n] uniforms in (0, 1]; greedy requests get 1 and draw nothing.

    Each request draws from its own generator (or the engine's when unseeded), n at a time in
    an order fixed by the request alone: that makes a seeded request reproduce whatever else
    is in the batch.
    """
    u = torch.ones(len(seqs), n)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            u[i] = 1.0 - torch.rand(n, generator=seq.generator or default)
    return u.to(device)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V], u [N] in (0, 1] -> tokens [N]."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=probs.shape[-1] - 1)

"""Lossless verification of ragged draft windows (Leviathan et al. 2023, Chen et al. 2023).

For request i with l_i verified drafts x_1..x_l, target distributions p_1..p_{l+1} and draft
distributions q_1..q_l:
  accept x_j with probability min(1, p_j(x_j) / q_j(x_j)), in order;
  at the first rejection emit a token from normalize(max(0, p_j - q_j)) and stop;
  if all l are accepted emit a bonus token from p_{l+1}.
The emitted tokens are distributed exactly as sampling from the target alone. Greedy rows
carry one-hot p and q (see engine.sampler), which turns the rule into "accept while the draft
equals the target's argmax, then emit the target's argmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetrispec.engine.sampler import sample


@dataclass
class Verdict:
    num_accepted: list[int]  # accepted drafts per request (<= l_i)
    next_tokens: list[int]  # the correction or bonus token per request
    oracle_accepted: list[int] | None = None  # accepted length had every draft been verified


def one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(*tokens.shape, vocab, device=tokens.device)
    return out.scatter_(-1, tokens.unsqueeze(-1), 1.0)


def verify(
    target_probs: torch.Tensor,  # [B, K + 1, V] p at each verified position (rows past l_i unused)
    draft_tokens: torch.Tensor,  # [B, K]
    draft_probs: torch.Tensor | None,  # [B, K, V]; None: all greedy (one-hot of draft_tokens)
    lengths: torch.Tensor,  # [B] l_i
    u_accept: torch.Tensor,  # [B, K] uniforms in (0, 1]; 1 for greedy rows
    u_final: torch.Tensor,  # [B]
    oracle: bool = False,
) -> Verdict:
    B, K = draft_tokens.shape
    V = target_probs.shape[-1]
    if draft_probs is None:
        draft_probs = one_hot(draft_tokens, V)
    idx = draft_tokens.unsqueeze(-1)
    p_x = target_probs[:, :K].gather(-1, idx).squeeze(-1)  # [B, K]
    q_x = draft_probs.gather(-1, idx).squeeze(-1)  # [B, K]
    ok = u_accept * q_x <= p_x  # accept test of every drafted position
    pos = torch.arange(K, device=ok.device)
    run = ok.long().cumprod(1)  # 1 while every draft so far was accepted
    accepted = (run * (pos[None, :] < lengths[:, None])).sum(1)  # [B]
    rows = torch.arange(B, device=ok.device)
    p_stop = target_probs[rows, accepted]  # [B, V] p at the first unaccepted position
    rejected = accepted < lengths
    q_stop = draft_probs[rows, accepted.clamp(max=K - 1)] * rejected[:, None]
    residual = (p_stop - q_stop).clamp_min_(0.0)
    # If p == q at that position a rejection has probability zero; fall back to p for safety.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_stop, residual)
    next_tokens = sample(residual, u_final)
    oracle_accepted = run.sum(1).tolist() if oracle else None
    return Verdict(accepted.tolist(), next_tokens.tolist(), oracle_accepted)


def verify_greedy(
    target_tokens: torch.Tensor,  # [B, K + 1] the target's argmax at each verified position (rows past l_i unused)
    draft_tokens: torch.Tensor,  # [B, K]
    lengths: torch.Tensor,  # [B] l_i
    oracle: bool = False,
) -> Verdict:
    """verify() for a batch of greedy requests, from argmax tokens instead of one-hot distributions.

    It is the same rule (accept while the draft equals the target's argmax, then emit the
    argmax) without materializing [B, K + 1, V] tensors.
    """
    B, K = draft_tokens.shape
    run = (draft_tokens == target_tokens[:, :K]).long().cumprod(1)
    pos = torch.arange(K, device=run.device)
    accepted = (run * (pos[None, :] < lengths[:, None])).sum(1)
    next_tokens = target_tokens.gather(1, accepted[:, None]).squeeze(1)
    return Verdict(accepted.tolist(), next_tokens.tolist(), run.sum(1).tolist() if oracle else None)

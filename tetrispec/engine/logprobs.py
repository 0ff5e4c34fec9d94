"""Log-probabilities of emitted tokens, for requests that ask (SamplingParams.logprobs = k).

They are the target model's own: log_softmax of its raw logits at the position that emitted
the token, before temperature, top-k or top-p (vLLM's default "raw logprobs"). That makes them
the same whatever sampled the token and whichever speculation method ran: a token accepted from
a draft gets the target's log-probability from the verify forward, never the draft's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, rows: list[list[int]], tokens: list[list[int]],
                   ks: list[int | None]) -> list[list[TokenLogprob]]:
    """Per request i: logits[rows[i][j]] ([N, V]) is the distribution that emitted tokens[i][j]
    (rows[i] and tokens[i] have one entry per token);
    ks[i] alternatives each (None: the request asked for nothing and gets an empty list).

    One log_softmax and one topk over just the rows asked for, read back once.
    """
    wanted = [i for i, k in enumerate(ks) if k is not None]
    flat_rows = [r for i in wanted for r in rows[i]]
    out: list[list[TokenLogprob]] = [[] for _ in ks]
    if not flat_rows:
        return out
    index = torch.tensor(flat_rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [n, V]
    chosen_ids = torch.tensor([t for i in wanted for t in tokens[i]], device=lp.device)
    chosen = lp.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
    k_max = max(ks[i] for i in wanted)
    top_lp, top_ids = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    n = 0
    for i in wanted:
        k = ks[i]
        for token in tokens[i]:
            out[i].append(TokenLogprob(token, chosen[n], list(zip(top_ids[n][:k], top_lp[n][:k]))))
            n += 1
    return out

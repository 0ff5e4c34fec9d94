"""Draft-model proposer: K batched draft forwards, keeping every position's distribution.

The draft may lag the sequence: bonus and correction tokens it has not seen, steps that ran
without speculation, and the prompt itself, which the draft first reads when it first drafts
(a method that decides not to speculate never pays for the draft's prefill). A short lag is
fed inside the first draft forward, so catching up costs no extra forward; a long one gets a
forward of its own first, so that one request's prompt does not pad every other query row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tetrispec.engine.sampler import draw_uniforms, logits_to_probs, sample
from tetrispec.engine.sequence import Sequence
from tetrispec.model.model_runner import ForwardItem, ModelRunner


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, K] proposed tokens
    logprobs: torch.Tensor  # [B, K] log-confidence of each proposed token (log softmax for greedy requests)
    probs: torch.Tensor | None  # [B, K, V] draft distributions; None when every request is greedy
    catch_up_seconds: float = 0.0  # wall time of the separate catch-up forward (long lags), if any
    catch_up_tokens: int = 0  # tokens that forward fed
    rows: int = 0  # sequences drafted for when only some were (scatter); 0: all of them

    @property
    def depth(self) -> int:
        return self.tokens.shape[1]

    def scatter(self, rows: list[int], batch_size: int) -> Proposal:
        """This proposal, made for the sequences at `rows`, as one for the whole batch: the other
        rows get no drafts (log-confidence -inf, a zero distribution), which no selector picks."""
        index = torch.tensor(rows, device=self.tokens.device)
        K = self.depth
        tokens = self.tokens.new_zeros(batch_size, K).index_copy_(0, index, self.tokens)
        logprobs = self.logprobs.new_full((batch_size, K), float("-inf")).index_copy_(0, index, self.logprobs)
        probs = None
        if self.probs is not None:
            probs = self.probs.new_zeros(batch_size, *self.probs.shape[1:]).index_copy_(0, index, self.probs)
        return Proposal(tokens, logprobs, probs, self.catch_up_seconds, self.catch_up_tokens, len(rows))


INLINE_CATCH_UP = 8  # lag (tokens) the first draft forward absorbs; longer lags are fed first

# Called after each draft forward with the log-probabilities so far [B, j]; False stops drafting.
KeepGoing = Callable[[torch.Tensor], bool]


class DraftProposer:
    def __init__(self, runner: ModelRunner, generator: torch.Generator) -> None:
        self.runner = runner
        self.generator = generator

    def propose(self, seqs: list[Sequence], depth: int, keep_going: KeepGoing | None = None) -> Proposal:
        params = [s.params for s in seqs]
        greedy = all(p.greedy for p in params)
        tokens, logprobs, probs = [], [], []
        lagging = [s for s in seqs if s.num_tokens - s.num_draft_cached > INLINE_CATCH_UP]
        catch_up_seconds, catch_up_tokens = 0.0, 0
        if lagging:
            start = time.perf_counter()
            catch_up_tokens = sum(s.num_tokens - 1 - s.num_draft_cached for s in lagging)
            self.runner.forward([ForwardItem(s.token_ids[s.num_draft_cached : -1], s.num_draft_cached, s.block_table)
                                 for s in lagging], "none")
            for s in lagging:
                s.num_draft_cached = s.num_tokens - 1
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize()
            catch_up_seconds = time.perf_counter() - start
        items = [ForwardItem(s.token_ids[s.num_draft_cached:], s.num_draft_cached, s.block_table) for s in seqs]
        for j in range(depth):
            if greedy:
                x, logprob = self.runner.forward_greedy(items, "last")  # [B], [B]
            else:
                logits = self.runner.forward(items, "last")  # [B, V]
                q = logits_to_probs(logits, params)
                x = sample(q, draw_uniforms(seqs, 1, self.generator, q.device).squeeze(1))  # [B]
                logprob = self._confidence(logits, q, x, params)
                probs.append(q)
            tokens.append(x)
            logprobs.append(logprob)
            if keep_going is not None and j + 1 < depth and not keep_going(torch.stack(logprobs, 1)):
                break
            if j + 1 < depth:
                xs = x.tolist()
                items = [ForwardItem([xs[i]], s.num_tokens + j, s.block_table) for i, s in enumerate(seqs)]
        # Fed: everything up to the last token, then the first len(tokens) - 1 drafts.
        for s in seqs:
            s.num_draft_cached = s.num_tokens + len(tokens) - 1
        return Proposal(
            torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(probs, 1) if probs else None,
            catch_up_seconds, catch_up_tokens,
        )

    @staticmethod
    def _confidence(logits: torch.Tensor, q: torch.Tensor, x: torch.Tensor, params) -> torch.Tensor:
        """log q(x) of each proposed token: the score selectors rank drafts by.

        A greedy request samples from a one-hot q, whose log q(x) is always 0 and says nothing;
        its draft's belief that x is right is the plain softmax (temperature 1) of the logits.
        """
        chosen = q.gather(1, x[:, None]).squeeze(1).clamp_min(1e-30).log()
        greedy = torch.tensor([p.greedy for p in params], device=q.device)
        if greedy.any():
            belief = torch.log_softmax(logits.float(), -1).gather(1, x[:, None]).squeeze(1)
            chosen = torch.where(greedy, belief, chosen)
        return chosen

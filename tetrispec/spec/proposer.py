"""Draft-model proposer: K batched draft forwards, keeping every position's distribution.

The draft may lag the sequence: bonus and correction tokens it has not seen, steps that ran
without speculation, and the prompt itself, which the draft first reads when it first drafts
(a method that decides not to speculate never pays for the draft's prefill). A short lag is
fed inside the first draft forward, so catching up costs no extra forward; a long one gets a
forward of its own first, so that one request's prompt does not pad every other query row.

Requests with adjusted logits (a logit bias, min_tokens, presence / frequency / repetition penalties)
draft from the adjusted distributions, counting their own earlier drafts as the target's verify rows
do: the draft then proposes what the target would, so more is accepted. Losslessness does not rest on
it: rejection sampling uses whatever q the draft sampled from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tetrispec.engine.penalties import apply_penalties
from tetrispec.engine.sampler import draw_uniforms, logits_to_probs, sample
from tetrispec.engine.sequence import Sequence
from tetrispec.model.model_runner import ForwardItem, ModelRunner


@dataclass
class Proposal:
    """Drafts of every request; request i drafted drafted[i] <= K tokens, and its positions past
    that hold log-confidence -inf and a zero distribution, which no selector picks."""

    tokens: torch.Tensor  # [B, K] proposed tokens
    logprobs: torch.Tensor  # [B, K] log-confidence of each proposed token (log softmax for greedy requests)
    probs: torch.Tensor | None  # [B, K, V] draft distributions; None when every request is greedy
    drafted: list[int]  # [B] tokens drafted per request
    catch_up_seconds: float = 0.0  # wall time of the separate catch-up forward (long lags), if any
    catch_up_tokens: int = 0  # tokens that forward fed
    deciding_seconds: float = 0.0  # host time of the keep-going decisions between the draft forwards
    # query tokens of each draft forward: the first also reads each request's short lag (the last step's
    # bonus token, and its last accepted draft), so it runs more rows than the requests drafted for
    level_tokens: tuple[int, ...] = ()

    @property
    def depth(self) -> int:
        return self.tokens.shape[1]

    @property
    def mean_rows(self) -> float:
        """Requests per draft forward, on average over the K forwards (the draft's cost driver)."""
        return sum(self.drafted) / max(self.depth, 1)

    def scatter(self, rows: list[int], batch_size: int) -> Proposal:
        """This proposal, made for the sequences at `rows`, as one for the whole batch: the other
        rows get no drafts."""
        index = torch.tensor(rows, device=self.tokens.device)
        K = self.depth
        tokens = self.tokens.new_zeros(batch_size, K).index_copy_(0, index, self.tokens)
        logprobs = self.logprobs.new_full((batch_size, K), float("-inf")).index_copy_(0, index, self.logprobs)
        probs = None
        if self.probs is not None:
            probs = self.probs.new_zeros(batch_size, *self.probs.shape[1:]).index_copy_(0, index, self.probs)
        drafted = [0] * batch_size
        for r, d in zip(rows, self.drafted):
            drafted[r] = d
        return Proposal(tokens, logprobs, probs, drafted, self.catch_up_seconds, self.catch_up_tokens,
                        self.deciding_seconds, self.level_tokens)


INLINE_CATCH_UP = 8  # lag (tokens) the first draft forward absorbs; longer lags are fed first

# Called after each draft forward with the log-probabilities so far [B, j] on the CPU (-inf where a request
# has stopped); returns, per request, whether to draft one more token for it. A request left out
# stops for this step; when none is left, drafting ends.
KeepGoing = Callable[[torch.Tensor], list[bool]]


class DraftProposer:
    def __init__(self, runner: ModelRunner, generator: torch.Generator) -> None:
        self.runner = runner
        self.generator = generator

    def propose(self, seqs: list[Sequence], depth: int, keep_going: KeepGoing | None = None) -> Proposal:
        greedy = all(s.params.greedy for s in seqs)
        penalized = any(s.adjusts_logits for s in seqs)
        history: list[list[int]] = [[] for _ in seqs]  # each request's drafts so far (penalized batches only)
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
        B = len(seqs)
        items = [ForwardItem(s.token_ids[s.num_draft_cached:], s.num_draft_cached, s.block_table) for s in seqs]
        active = list(range(B))  # requests still drafting; items[a] is active[a]'s next forward
        device = self.runner.device
        logprobs = torch.full((B, depth), float("-inf"), device=device)
        tokens = torch.zeros(B, depth, dtype=torch.long, device=device)
        probs = None
        drafted = [0] * B
        deciding_seconds, level_tokens = 0.0, []
        for j in range(depth):
            level_tokens.append(sum(len(item.tokens) for item in items))
            sub = [seqs[i] for i in active]
            index = slice(None) if len(active) == B else torch.tensor(active, device=device)
            if greedy and not penalized:
                x, logprob = self.runner.forward_greedy(items, "last")  # [A], [A]
            else:
                logits = self.runner.forward(items, "last")  # [A, V]
                logits = apply_penalties(logits, sub, [history[i] for i in active])
                params = [s.params for s in sub]
                q = logits_to_probs(logits, params)  # one-hot argmax for greedy rows
                x = sample(q, draw_uniforms(sub, 1, self.generator, q.device).squeeze(1))  # [A]
                logprob = self._confidence(logits, q, x, params)
                if not greedy:  # an all-greedy batch keeps probs None: q is the one-hot of its drafts
                    if probs is None:
                        probs = q.new_zeros(B, depth, q.shape[1])
                    probs[index, j] = q
            tokens[index, j] = x
            logprobs[index, j] = logprob.float()
            for i in active:
                drafted[i] += 1
            if j + 1 == depth:
                break
            if keep_going is not None:
                scores = logprobs[:, : j + 1].cpu()  # selectors decide on the host
                start = time.perf_counter()
                keep = keep_going(scores)
                deciding_seconds += time.perf_counter() - start
                kept = [a for a, i in enumerate(active) if keep[i]]
            else:
                kept = list(range(len(active)))
            if not kept:
                break
            xs = x.tolist()
            if penalized:
                for a, i in enumerate(active):
                    history[i].append(xs[a])
            items = [ForwardItem([xs[a]], sub[a].num_tokens + j, sub[a].block_table) for a in kept]
            active = [active[a] for a in kept]
        K = max(drafted)
        # Fed: everything up to the last token, then the first drafted[i] - 1 drafts.
        for s, d in zip(seqs, drafted):
            s.num_draft_cached = s.num_tokens + d - 1
        return Proposal(tokens[:, :K], logprobs[:, :K], None if probs is None else probs[:, :K], drafted,
                        catch_up_seconds, catch_up_tokens, deciding_seconds, tuple(level_tokens))

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

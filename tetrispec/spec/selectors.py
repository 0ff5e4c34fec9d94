"""Selectors decide how many drafts of each request the target verifies (l_i).

Every selector sees only draft-side information, which keeps verification lossless. The
engine asks `depth(batch)` for how deep to draft this step (0: no speculation), then
`select(logprobs, batch)` for the lengths, and reports outcomes through `observe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetrispec.spec.cost_model import CostModel, StepRecord


@dataclass
class BatchInfo:
    batch_size: int
    mean_len: float  # mean tokens per running sequence (attention cost)
    entering_tokens: int = 0  # prompt tokens of the sequences in their first decode step
    lag_tokens: int = 0  # tokens the draft has not read, of the other sequences (a pause in drafting)
    remaining: float = float("inf")  # mean output tokens the sequences may still produce
    lags: tuple[int, ...] = ()  # per sequence: tokens the draft has not read (prompt included)
    remainings: tuple[float, ...] = ()  # per sequence: output tokens it may still produce


def tetris_select(draft_logprobs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Tetris: the `capacity` draft tokens with the highest cumulative draft probability.

    draft_logprobs [B, K] holds log q of each proposed token; returns lengths l [B] with
    sum(l) = min(capacity, B * K). Scores fall along a draft, and ties are broken in favour
    of the shallower position, so the chosen set is a prefix of every request's draft.
    """
    B, K = draft_logprobs.shape
    scores = draft_logprobs.clamp(max=0.0).cumsum(1)  # [B, K], non-increasing along K
    flat = scores.t().reshape(-1)  # position-major: index j * B + i
    order = torch.sort(flat, descending=True, stable=True).indices[: max(0, int(capacity))]
    return torch.bincount(order % B, minlength=B)


def selectable_rows(draft_logprobs: torch.Tensor, capacity: int) -> list[bool]:
    """Whether each request's next draft token could still be among tetris_select's `capacity`.

    draft_logprobs [B, j] holds the drafts so far (-inf past a request's last draft). Once there
    are `capacity` tokens, the capacity-th best score T bounds what gets in: a deeper token scores
    at most its request's last score, and at T exactly it ranks behind all of them (ties go to the
    shallower position), so a request goes on only while its last score is above T.
    """
    scores = draft_logprobs.clamp(max=0.0).cumsum(1)  # [B, j]
    last = scores[:, -1]
    drafted = int(torch.isfinite(scores).sum())
    if capacity <= 0:
        return [False] * scores.shape[0]
    if drafted < capacity:
        return torch.isfinite(last).tolist()
    threshold = torch.topk(scores.reshape(-1), capacity).values[-1]
    return (last > threshold).tolist()


class Selector:
    """No speculation: every step is a plain decode."""

    name = "none"
    max_depth = 0
    row_plan: tuple[int, ...] | None = None  # see attach_cost_model

    def depth(self, batch: BatchInfo) -> int:
        return 0

    def select(self, draft_logprobs: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return torch.zeros(draft_logprobs.shape[0], dtype=torch.long)

    def observe(self, proposal_logprobs: torch.Tensor, lengths: list[int], accepted: list[int]) -> None:
        """Outcome of a speculative step, for selectors that learn."""

    def observe_step(self, record: StepRecord) -> None:
        """Wall time of every decode step (plain or speculative), for selectors that price steps."""

    def keep_going(self, batch: BatchInfo):
        """Optional early stop for drafting (see proposer.KeepGoing); None drafts the full depth."""
        return None

    def draft_rows(self, batch: BatchInfo) -> list[int] | None:
        """Which sequences to draft for this step (asked after depth); None: all of them. The
        others are verified with no drafts, i.e. decoded plainly inside the same target forward."""
        return None

    def attach_cost_model(self, cost: CostModel, row_plan: tuple[int, ...] | None = None) -> None:
        """cost: the step-time profile; row_plan: the target runner's (ModelRunner.row_plan)."""
        self.cost = cost
        self.row_plan = row_plan


class FixedK(Selector):
    """Standard speculative decoding: every request verifies k drafts."""

    name = "fixed"

    def __init__(self, k: int) -> None:
        self.k = self.max_depth = k

    def depth(self, batch: BatchInfo) -> int:
        return self.k

    def select(self, draft_logprobs: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return torch.full((draft_logprobs.shape[0],), draft_logprobs.shape[1], dtype=torch.long)


class Tetris(Selector):
    """Draft k + e per request, verify the best C = k * B (or a fixed C) over the batch."""

    name = "tetris"

    def __init__(self, k: int, extra: int, turn_on_batch_size: int = 2, capacity: int | None = None,
                 stop_early: bool = True) -> None:
        self.k, self.extra, self.turn_on, self.capacity = k, extra, turn_on_batch_size, capacity
        self.stop_early = stop_early
        self.max_depth = k + extra

    def depth(self, batch: BatchInfo) -> int:
        return self.k + self.extra if batch.batch_size >= self.turn_on else self.k

    def _capacity(self, batch: BatchInfo) -> int:
        return self.capacity if self.capacity is not None else self.k * batch.batch_size

    def select(self, draft_logprobs: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        if batch.batch_size < self.turn_on:
            return torch.full((draft_logprobs.shape[0],), min(self.k, draft_logprobs.shape[1]), dtype=torch.long)
        return tetris_select(draft_logprobs, self._capacity(batch))

    def keep_going(self, batch: BatchInfo):
        """Stop drafting for a request as soon as none of its deeper tokens can be selected: the
        selection is exactly the one over full drafts, for fewer draft rows past depth k + 1. Not
        under the shadow oracle (stop_early False), whose bound counts the paper's full k + e drafts."""
        if batch.batch_size < self.turn_on or not self.stop_early:
            return None
        capacity = self._capacity(batch)
        return lambda logprobs: selectable_rows(logprobs, capacity)


class DSD(Selector):
    """SmartSpec goodput: one k for the batch, re-chosen every `interval` steps.

    goodput(k) = B * (1 - a^(k+1)) / (1 - a) / T(B, s, k), with a the EMA token acceptance
    rate and T the profiled step time; k = 0 (no speculation) gets a 1.1x bonus.
    """

    name = "dsd"

    def __init__(self, max_k: int, interval: int = 20, alpha: float = 0.7, cost: CostModel | None = None) -> None:
        self.cost, self.max_depth, self.interval = cost, max_k, interval
        self.alpha = alpha
        self.steps = 0
        self.k = 1

    def goodput(self, k: int, batch: BatchInfo) -> float:
        a = min(self.alpha, 0.999)
        tokens = batch.batch_size * (1 - a ** (k + 1)) / (1 - a)
        time = self.cost.step_time(batch.batch_size, batch.mean_len, k)
        return tokens / time * (1.1 if k == 0 else 1.0)

    def depth(self, batch: BatchInfo) -> int:
        if self.steps % self.interval == 0:
            best, best_k = self.goodput(0, batch), 0
            for k in range(1, self.max_depth + 1):
                g = self.goodput(k, batch)
                if g <= best:
                    break
                best, best_k = g, k
            self.k = best_k
        self.steps += 1
        return self.k

    def select(self, draft_logprobs: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return torch.full((draft_logprobs.shape[0],), draft_logprobs.shape[1], dtype=torch.long)

    def observe(self, proposal_logprobs: torch.Tensor, lengths: list[int], accepted: list[int]) -> None:
        drafted = sum(lengths)
        if drafted:
            self.alpha = 0.85 * self.alpha + 0.15 * (sum(accepted) / drafted)


def make_selector(spec, has_draft: bool) -> Selector:
    """The selector named by the speculation config (tetris by default when a draft exists)."""
    method = spec.method or ("tetris" if has_draft else "none")
    if method == "none" or not has_draft:
        return Selector()
    k = spec.num_speculative_tokens
    if method == "fixed":
        return FixedK(k)
    if method == "dsd":
        return DSD(spec.dsd_max_k, spec.dsd_update_interval)
    if spec.tetris_capacity == "auto":
        from tetrispec.spec.auto_capacity import AutoTetris

        return AutoTetris(max_depth=k + spec.tetris_extra_proposals)
    return Tetris(k, spec.tetris_extra_proposals, spec.tetris_turn_on_batch_size, spec.tetris_capacity,
                  stop_early=not spec.shadow_oracle)

"""Tetris with a goodput-chosen capacity: verify only the drafts that pay for themselves.

Two pieces:
- AcceptanceEstimator maps a draft token's probability q(x) and its position in the draft to
  the probability that the target accepts it given that its prefix was accepted. It starts
  as the identity (the draft's own belief) and is calibrated online from verification
  outcomes by isotonic regression over probability bins, one table per position, so within
  a position a ranking by its estimates stays a ranking by q.
- AutoTetris ranks every drafted token by the running product of estimates along its draft
  (the estimated probability that it is accepted), then picks the capacity C that maximizes
  expected emitted tokens per second, (B + sum of the C best estimates) / predicted step time,
  with the profiled cost model. C = 0 is a plain decode step. A sequence is drafted for only
  when what the draft must first read of it (its prompt, a pause's tokens), spread over the steps
  it has left, is worth its drafts; the others ride along undrafted. Drafting stops at the depth
  where one more level is not expected to pay for its draft forward (the next token's
  confidence predicted from how confidence moved along past drafts), and is skipped entirely
  when even a typical first level would not pay.
Only draft-side information (and past outcomes) drives the choice: verification stays lossless.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tetrispec.model.gemm_rows import MAX_ROWS
from tetrispec.spec.cost_model import CostModel, StepRecord, isotonic
from tetrispec.spec.proposer import INLINE_CATCH_UP
from tetrispec.spec.selectors import BatchInfo, Selector


class AcceptanceEstimator:
    """P(draft token accepted | its prefix accepted), from its draft probability q and its position.

    One table over q bins per draft position (the last one shared by all deeper positions),
    each isotonic in q. Position matters at the same q: a token whose prefix was accepted sits
    in an easier context, so on the default pair a q = 0.6 token is accepted about 55% of the
    time at position 0 and 75-80% deeper. A position's table is shrunk toward the pooled one
    (which is shrunk toward q itself), so a sparsely seen position follows the pooled fit.

    It also counts how a draft's confidence moves from one position to the next (q bin -> next
    q bin, draft-side only), which prices drafting one more level before it is drafted.
    The tables are small numpy arrays, refitted in numpy; what runs between the forwards of a step
    (estimate_drafts, expected_next_gain) reads list copies of them in plain Python (see _best_capacity).
    """

    def __init__(self, num_bins: int = 20, positions: int = 3, prior_weight: float = 8.0, warmup: int = 500,
                 reliability_bins: int = 10, refit_every: int = 32) -> None:
        self.num_bins, self.positions = num_bins, positions
        self.prior_weight = prior_weight
        self.warmup = warmup
        self.centers = (np.arange(num_bins) + 0.5) / num_bins
        self.trials = np.zeros((positions, num_bins))
        self.accepts = np.zeros((positions, num_bins))
        self.transitions = np.zeros((num_bins, num_bins))  # [q bin at j, q bin at j + 1], drafted pairs
        self.firsts = np.zeros(num_bins)  # q bins of first drafts (position 0), verified or not
        # reliability of the estimates as they were used (after warm-up), per estimate bin
        self.reliability_bins = reliability_bins
        self.seen = 0
        # refit after this many outcomes (a refit is ~0.1 ms; one step's outcomes move the fit little)
        self.refit_every = refit_every
        self.rel_n = np.zeros(reliability_bins)
        self.rel_pred = np.zeros(reliability_bins)
        self.rel_hits = np.zeros(reliability_bins)
        self._refit()

    def _row(self, positions) -> np.ndarray:
        """The table of each position (the last one serves every deeper position)."""
        return np.minimum(_array(positions).astype(np.int64), self.positions - 1)

    @staticmethod
    def _bin(q: np.ndarray, bins: int) -> np.ndarray:
        """q in [0, 1] -> bin index (q = 1 in the top bin). In float64, as the per-step reads in plain
        Python bin (estimate_drafts): float32 put q = 0.9 in the bin above the one they read it in."""
        return np.minimum((np.asarray(q, dtype=np.float64) * bins).astype(np.int64), bins - 1)

    def _refit(self) -> None:
        def fit(trials: np.ndarray, accepts: np.ndarray, prior: np.ndarray) -> list[float]:
            w = trials + self.prior_weight
            return isotonic(((accepts + self.prior_weight * prior) / w).tolist(), w.tolist())

        pooled = np.array(fit(self.trials.sum(0), self.accepts.sum(0), self.centers))
        self.table = np.array([fit(t, a, pooled) for t, a in zip(self.trials, self.accepts)])  # [P, bins]
        self.table_rows = self.table.tolist()  # the same, for the per-step reads in plain Python
        self.pending = 0  # outcomes not yet in the fit
        self.next_bin = None  # the move table, rebuilt when next read (_refit_moves)
        self.typical: dict[int, np.ndarray] = {}  # typical_first_estimates per batch size, until the next change
        self.levels: dict[int, np.ndarray] = {}  # typical_level_means per depth, likewise

    def _refit_moves(self) -> None:
        # next q bin given this one: the counts plus one pseudo-count spread evenly (an unseen bin is agnostic)
        counts = self.transitions + 1.0 / self.num_bins
        self.next_bin = counts / counts.sum(1, keepdims=True)  # [bins, bins]
        self.next_rows = self.next_bin.tolist()

    def estimate(self, q, positions) -> np.ndarray:
        """q: draft probabilities of proposed tokens (any shape, array or CPU tensor); positions: their
        depth in the draft (0 = first), same shape or an int -> acceptance estimates (float64 array)."""
        q = _array(q)
        return self.table[self._row(positions), self._bin(q, self.num_bins)]  # index arrays broadcast

    def estimate_drafts(self, q: list[list[float]]) -> list[list[float]]:
        """q: each request's draft probabilities, position j at index j -> their estimates (plain Python:
        this runs after every draft forward, see _best_capacity)."""
        table, last, bins = self.table_rows, self.positions - 1, self.num_bins
        return [[table[min(j, last)][min(int(x * bins), bins - 1)] for j, x in enumerate(row)] for row in q]

    def expected_next_gain(self, q_last: list[float], cum_last: list[float], position: int, threshold: float) -> float:
        """Expected sum over requests of max(0, estimate of their next draft token - threshold), the
        next token's q unknown: its bin follows the counted moves from the last token's q bin."""
        if self.next_bin is None:
            self._refit_moves()
        table, bins = self.table_rows[min(position, self.positions - 1)], self.num_bins
        gain = 0.0
        for q, cum in zip(q_last, cum_last):
            moves = self.next_rows[min(int(q * bins), bins - 1)]
            gain += sum(p * (cum * t - threshold) for p, t in zip(moves, table) if cum * t > threshold)
        return gain

    def best_estimate(self, position: int) -> float:
        """The highest estimate any token at this position can get (the table is isotonic in q)."""
        return self.table_rows[min(position, self.positions - 1)][-1]

    def update(self, q, positions, outcomes) -> None:
        """Verified tokens whose prefix was accepted: draft probabilities q [N], positions [N], outcomes [N] 0/1."""
        q, outcomes = _array(q), _array(outcomes).astype(np.float64)
        if q.size == 0:
            return
        if self.seen >= self.warmup:
            pred = self.estimate(q, positions)
            b = self._bin(pred, self.reliability_bins)
            np.add.at(self.rel_n, b, 1)
            np.add.at(self.rel_pred, b, pred)
            np.add.at(self.rel_hits, b, outcomes)
        self.seen += q.size
        cell = (self._row(positions), self._bin(q, self.num_bins))
        np.add.at(self.trials, cell, 1)
        np.add.at(self.accepts, cell, outcomes)
        self.pending += q.size
        if self.pending >= self.refit_every or self.seen <= self.warmup:
            self._refit()

    def typical_first_estimates(self, batch_size: int) -> np.ndarray:
        """Estimates of a typical batch's first drafts, before they are drafted: the quantiles of
        past first drafts' estimates, one per request (a flat pseudo-count per q bin: before any
        first draft was counted, every bin is as likely)."""
        if batch_size in self.typical:  # read every step, changed only when outcomes are learned
            return self.typical[batch_size]
        share = self.firsts + 1.0 / self.num_bins
        values = self.table[0][::-1]  # best first (the table is isotonic in q)
        cum = np.cumsum(share[::-1]) / share.sum()
        index = np.searchsorted(cum, (np.arange(batch_size) + 0.5) / batch_size)
        self.typical[batch_size] = values[np.minimum(index, self.num_bins - 1)]
        return self.typical[batch_size]

    def typical_level_means(self, depth: int) -> np.ndarray:
        """The mean cumulative estimate at depths 1..depth of a typical draft, before it is drafted:
        first drafts' q bins as counted, then the counted moves from each q bin to the next."""
        if depth in self.levels:
            return self.levels[depth]
        if self.next_bin is None:
            self._refit_moves()
        share = self.firsts + 1.0 / self.num_bins
        mass = share / share.sum() * self.table[0]  # [bins]: expected cumulative estimate, by current q bin
        means = [mass.sum()]
        for j in range(1, depth):
            mass = (mass @ self.next_bin) * self.table[min(j, self.positions - 1)]
            means.append(mass.sum())
        self.levels[depth] = np.array(means)
        return self.levels[depth]

    def count_transitions(self, q: np.ndarray) -> None:
        """q [B, K]: the drafts of one step (draft-side only: every drafted pair counts, verified or not;
        q = 0 marks a position that was not drafted).
        The move table is rebuilt when next read."""
        b = self._bin(q, self.num_bins)
        np.add.at(self.firsts, b[:, 0], 1)
        self.typical, self.levels = {}, {}
        if q.shape[1] > 1:
            pairs = q[:, 1:] > 0  # a request that stopped drafting has q = 0 past its last draft
            np.add.at(self.transitions, (b[:, :-1][pairs], b[:, 1:][pairs]), 1)
            self.next_bin = None

    def reliability(self) -> dict:
        """Reliability table and expected calibration error of the estimates as they were used after
        warm-up (see reliability_table)."""
        return {"observations": self.seen, **reliability_table(self.rel_n, self.rel_pred, self.rel_hits)}

    def state(self) -> dict:
        return {"num_bins": self.num_bins, "positions": self.positions, "trials": self.trials.tolist(),
                "accepts": self.accepts.tolist(), "transitions": self.transitions.tolist(),
                "firsts": self.firsts.tolist()}

    def load_state(self, state: dict) -> None:
        """Take a persisted fit of the same shape (anything else, e.g. an older format, is ignored)."""
        if state.get("num_bins") == self.num_bins and state.get("positions") == self.positions:
            self.trials = np.array(state["trials"], dtype=np.float64)
            self.accepts = np.array(state["accepts"], dtype=np.float64)
            if "transitions" in state:
                self.transitions = np.array(state["transitions"], dtype=np.float64)
            if "firsts" in state:
                self.firsts = np.array(state["firsts"], dtype=np.float64)
            self.seen = self.warmup  # a persisted fit is past its warm-up
            self._refit()


def reliability_table(counts: np.ndarray, estimates: np.ndarray, hits: np.ndarray) -> dict:
    """Per estimate bin (10 equal-width bins, the usual choice): count, sum of estimates, accepted.

    Returns the rows, the expected calibration error (ECE), and its sampling floor: the ECE that a
    perfectly calibrated estimator would show on average with these bin counts, sum over bins of
    n_b / N * E|mean of n_b Bernoulli(p_b) draws - p_b| ~ sqrt(2 p_b (1 - p_b) / (pi n_b)). With a few
    hundred outcomes the floor alone is a few percent, which an ECE must be read against.
    """
    rows, total, ece, floor = [], float(counts.sum()), 0.0, 0.0
    nb = len(counts)
    for b in range(nb):
        n = float(counts[b])
        if n:
            pred, obs = float(estimates[b]) / n, float(hits[b]) / n
            ece += n / total * abs(pred - obs)
            floor += n / total * math.sqrt(2 * pred * (1 - pred) / (math.pi * n))
            rows.append({"bin": [b / nb, (b + 1) / nb], "count": int(n),
                         "mean_estimate": round(float(pred), 4), "acceptance_rate": round(float(obs), 4)})
    return {"ece": round(ece, 4) if total else None, "ece_floor": round(floor, 4) if total else None,
            "table": rows}


def _array(x) -> np.ndarray:
    """A float/int array from a numpy array, a tensor (any device) or a Python number/list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x)


@dataclass
class StepClock:
    """How real steps compare with the profile at one range of batch sizes (1, 2, 3-4, 5-8, ...).

    ratio: measured / profiled time of plain steps, of drafting, and of the rest of a
    speculative step: the mean of the first measurements, then an EMA (a fresh range must not
    spend tens of steps walking away from 1.0). A range has its own because the profile's error
    depends on the batch size: ratios learned at batch 1 must not price steps at batch 32.
    """

    ratio: dict[str, float] = field(default_factory=lambda: {"plain": 1.0, "draft": 1.0, "verify": 1.0})
    plain_run: int = 0  # consecutive plain steps observed
    spec_run: int = 0  # consecutive speculative steps observed
    counts: dict[str, int] = field(default_factory=dict)  # measurements of each kind of step in this range
    # Verifies of different sizes off the profile by different amounts: per size bucket (verify_bucket), the
    # bucket's timings over the verify ratio, and how many there were. A bucket not timed yet prices at 1.0.
    shape: dict[int, float] = field(default_factory=dict)
    shape_counts: dict[int, int] = field(default_factory=dict)
    shape_timed: dict[int, int] = field(default_factory=dict)  # the verify timing (counts) a size was last timed at
    uniform: int = 0  # verifies timed of the same drafts for every sequence (the verify ratio's; observe_step)

    def priced_shape(self) -> dict[int, float]:
        """The size corrections prices use: a size timed fewer than SHAPE_SETTLED times is priced no dearer
        than the verify ratio. A size is timed only when it is chosen, so one priced out by its first timings
        (two 1-draft verifies at batch 1 in a slow spell, 2.1x) was never chosen again, and auto drafted one
        level and verified nothing on 208 of 560 steps."""
        return {b: s if self.shape_counts[b] >= SHAPE_SETTLED else min(s, 1.0) for b, s in self.shape.items()}


def first_forward_tokens(lag: float) -> float:
    """Query tokens a sequence with this lag adds to the first draft forward: its lag and its last token
    (a lag too long to read inline gets a forward of its own first; see proposer.INLINE_CATCH_UP)."""
    return lag + 1 if lag < INLINE_CATCH_UP else 1


def lag_apart(lag: float) -> float:
    """Tokens of this lag that auto prices as a catch-up of their own (at a lag of exactly INLINE_CATCH_UP
    it counts neither these nor the first forward's extra tokens: see first_forward_tokens)."""
    return lag if lag > INLINE_CATCH_UP else 0.0


def verify_bucket(batch_size: int, drafts: int) -> int:
    """Size key of a verify of this many drafts on top of the batch: while the forward's rows are few
    enough for a row plan (gemm_rows.MAX_ROWS), its token count (negative, apart from the other keys);
    past that, by drafts: 0, 1, 2, 3-4, 5-8, ... A short matmul's speed moves from one row count to the
    next, and the plan a run adopts does not always pad the slow counts away: in run AM (c = 8) 14-token
    verifies ran at 101 ms and 16-token ones at 90, where plain steps took 89; in one bucket for 5-8
    drafts both were priced alike, 14 below 16 by the plan, and auto verified 6 of 8 drafts on 44 steps."""
    if drafts and batch_size + drafts <= MAX_ROWS:
        return -(batch_size + drafts)
    return (drafts - 1).bit_length() + 1 if drafts else 0


def uniform_bucket(bucket: int, batch_size: int) -> bool:
    """Whether verify_bucket(batch_size, ...) keys verifies of the same drafts for every sequence (see observe_step)."""
    return bucket == 0 or (bucket < 0 and -bucket % batch_size == 0)


def best_capacity(values, batch_size: int, fixed_time: float, cost: CostModel, mean_len: float,
                  verify_scale: float = 1.0) -> tuple[int, float]:
    """values: estimated acceptance of every candidate token (any shape, sorted or not).

    Returns (C, rate): the C best tokens maximize (B + their sum) / (fixed_time + verify(B + C)).
    """
    n = np.arange(_array(values).size + 1, dtype=np.float64)
    verify = verify_scale * cost.target_time(batch_size, batch_size + n, mean_len)
    return _best_capacity(values, batch_size, fixed_time, verify.tolist())


def _best_capacity(values, batch_size: int, fixed_time: float, verify: list[float]) -> tuple[int, float]:
    """best_capacity with the verify times of capacities 0, 1, ... given (at least one more than values).

    Plain Python over a list: this runs between the forwards of a step, when the forward has just
    streamed the weights through the CPU caches and each numpy call costs ~10 us where it costs 1 us
    warm (sorting 16 estimates this way took 95 us through numpy, 16 us in Python). A few dozen
    numbers per step add up: auto's per-step host work was ~1 ms, 1-3% of a step at batch 1-8.
    """
    if not isinstance(values, list):
        values = _array(values).ravel().tolist()
    best, best_rate, gain = 0, batch_size / (fixed_time + verify[0]), 0.0
    for c, v in enumerate(sorted(values, reverse=True), 1):
        gain += v
        rate = (batch_size + gain) / (fixed_time + verify[c])
        if rate > best_rate:
            best, best_rate = c, rate
    return best, best_rate


REUSE_MARGIN = 0.02  # a verdict this clear (one kind of step predicted this much faster) ...
REUSE_STEPS = 8  # ... stands for this many more steps at the same batch size without being re-priced,
REUSE_MAX = 32  # ... and one clearer than EXPLORE_MARGIN longer, in proportion, up to this many (reuse_steps)


def reuse_steps(margin: float, timings: int) -> int:
    """Steps a verdict won by `margin` (the loser's rate is 1 - margin of the winner's) stands for, the
    kind of step it runs timed `timings` times in its batch-size range. To flip, the inputs must move by
    about the margin, and once the clock has settled (SETTLED timings) one step moves them little (a
    token more of context, a clock ratio by a twentieth of the step's deviation); at batch 1-2, where
    drafting wins by 15-30%, re-pricing every 8 steps was most of depth()'s host time. Near a tie
    (within EXPLORE_MARGIN) the plain steps' timing is still to be checked, and before the clock settles
    each timing moves its ratio by up to the whole deviation, so such verdicts stay short."""
    if timings < SETTLED:
        return REUSE_STEPS
    return min(REUSE_MAX, max(REUSE_STEPS, int(REUSE_STEPS * margin / EXPLORE_MARGIN)))


@dataclass
class Verdict:
    """A clear choice between plain and speculative steps, kept for a few steps: re-pricing it every
    step cost auto about 0.6% of plain decoding's time at batch 1 (and 0.2% of a step at batch 4 when
    drafting), and the inputs move little between steps. Drafting's price moves with the draft's lag
    (catch-up) and the output left (the steps it is spread over): a plain verdict stands while the lag
    only grows and the output left only shrinks (drafting only gets dearer); a drafting verdict (every
    sequence drafted for) while no sequence has more than the first draft forward absorbs to catch up
    on (then neither matters) and none has entered."""

    batch_size: int
    depth: int  # 0: plain steps; else drafting for every sequence to this depth
    lag_tokens: int  # the draft's lag and the output left when it was priced (plain verdicts)
    remaining: float
    plain_time: float  # predicted time of one plain step (counted toward the next probe)
    probe_cost: float  # what the next probe is priced at (a due probe ends a plain verdict)
    steps: int = REUSE_STEPS  # further steps it stands for (counted by observe_step; see reuse_steps)

    def holds(self, batch: BatchInfo) -> bool:
        if self.steps <= 0 or batch.batch_size != self.batch_size:
            return False
        if self.depth:
            return batch.entering_tokens == 0 and max(batch.lags, default=batch.lag_tokens) <= INLINE_CATCH_UP
        return batch.lag_tokens >= self.lag_tokens and batch.remaining <= self.remaining


@dataclass
class StepPrices:
    """One step's predicted times, corrected by its batch-size range's clock. Computed once a step
    and read by every keep_going decision and by select: right after a forward has streamed the
    weights through the caches, each numpy call costs several times what it does in a micro-benchmark,
    and pricing the same curve three times a step cost auto about 1% of its time at batch 1. The
    per-step part (the clock's ratios and the mean context on a line kept per batch size) is plain Python."""

    key: tuple
    cost: CostModel
    draft_ratio: float
    mean_len: float
    plain: float  # one plain step (depth() compares drafting with it; the floor under every verify price)
    verify: list[float]  # [B * max_depth + 1]: the target forward verifying B + c tokens, c = 0, 1, ... (a list:
    # the per-step decisions read it in plain Python, see _best_capacity)

    def draft(self, rows):
        """One draft forward over `rows` sequences (a number, or an array of row counts -> an array)."""
        return self.draft_ratio * self.cost.draft_time(rows, self.mean_len)


SWITCH_MARGIN = 0.03  # drafting after plain steps, with a catch-up to pay, must be predicted this much faster
EXPLORE_MARGIN = 0.1  # plain steps predicted within this of drafting are timed before they are ruled out
EXPLORE_STEPS = 4  # ... for this many steps, once speculative steps have been timed EXPLORE_AFTER times
EXPLORE_AFTER = 8
REEXPLORE_AFTER = 64  # ... and once more after this many speculative steps in a row
REEXPLORE_BUDGET = 0.01  # re-timing drafting: its catch-up at most this fraction of the plain time since it ran
PROBE_BUDGET = 0.03  # probes may cost at most this fraction of the plain decoding time between them
# A probe drafts for this many sequences, those the draft has read the most of. Its price is mostly their
# catch-up: with 4, probes were 0.8-1.3% of plain decoding's time at c = 8 (modelled) and found nothing to
# verify; 2, with the first probe after 64 plain steps, gained 0.7 and 1.2% there (same-process A/B, two seeds)
# and was level at c = 4, 16 and 32.
PROBE_ROWS = 2
LEARN_EVERY = 32  # speculative steps whose outcomes are learned from in one go (observe) ...
WARMUP_LEARN_EVERY = 4  # ... and while the estimator warms up (its first outcomes move it most)
RATIO_DRIFT = 0.001  # per step past 16 in a row of one kind: the other kind's clock ratios toward it
SETTLED = 20  # a clock ratio is the mean of its first this many timings, then an EMA of weight 1 / SETTLED
# While a kind settles, one timing counts as at most this many times its ratio so far (and at least the
# inverse). On session 20's VM, steps of about 100 ms stalled for 0.3-1.3 s every few dozen steps, at random;
# each such timing, counted in full (up to 8x), moved a settled ratio by up to 35%, and auto's choices at
# c = 1 swung with it.
SPIKE = 1.5
# ... and once the kind has been timed SETTLED times, at most this many times. Slow spells last dozens of steps
# (session 21, batch 1: 50 verifies at 0.9-2.6x their usual time) and each kind is timed only when it runs:
# counted at up to 1.5x, one spell during a run of speculative steps took the verify ratio from 0.95 to 1.07,
# over a plain ratio of 0.99 timed outside it, and auto decoded plainly for 64 steps (until a probe) where
# drafting was about 12% ahead; replayed at 1.1, the verify ratio stays at 0.97. A host 1.6x slower is followed
# within about 100 steps.
SPIKE_SETTLED = 1.1
# A verify size's correction (StepClock.shape) starts as this many timings of 1.0: a size is chosen only while it
# pays, so one first timing in a slow spell, counted in full, could price it out for good.
SHAPE_PRIOR = 2
# ... it is priced no dearer than the verify ratio until timed this many times, and once it has gone untimed for
# 16 speculative steps it drifts back toward 1.0 by SHAPE_DRIFT a step, so a size priced out in a slow spell is
# tried again.
# (Held at 1.0 for 20 timings, the dear sizes at batch 4, 5-7 tokens at 1.03-1.2x the profile where 8 ran at
# 0.99-1.08x, were chosen all run long: runs AM, AO and AP.)
SHAPE_SETTLED = 4
SHAPE_DRIFT = 0.01
# The per-depth means (level_means) are an EMA of each drafting step's mean cumulative estimate, at weight
# LEVEL_WEIGHT for a step of LEVEL_ROWS or more drafted sequences and in proportion below: at batch 1 one step
# is one request's draft, and at weight 0.1 a handful of unconfident drafts made drafting look unpaying (run
# AO, c = 1), though a draft after an unconfident one is still accepted 26% of the time (39% overall).
LEVEL_WEIGHT, LEVEL_ROWS = 0.1, 8
# While drafting is paused (past 16 plain steps in a row), the means drift back toward their long-run values
# (an EMA at a tenth of the weight) by this much a step: nothing is drafted to refresh them, and in run AO
# auto decoded plainly for about 170 steps after the clocks had come back to favour drafting.
LEVEL_DRIFT = 0.02


class AutoTetris(Selector):
    name = "tetris-auto"

    def __init__(self, max_depth: int, estimator: AcceptanceEstimator | None = None,
                 cost: CostModel | None = None, probe_every: int = 64) -> None:
        self.max_depth = max_depth
        self.estimator = estimator or AcceptanceEstimator()
        self.cost = cost
        self.state_path: Path | None = None
        self.probe_every = probe_every  # first probe interval; doubles while probes keep saying "no"
        self.probe_interval = probe_every
        # EMA of the mean cumulative estimate per depth, from the estimator's projection at first (a
        # flat prior claimed every token past the first is accepted for sure: at batch 64 on a fresh
        # estimator that priced four levels as paying and drafted the whole batch's prompts)
        self.level_means = [float(m) for m in self.estimator.typical_level_means(max_depth)]
        self.level_baseline = list(self.level_means)  # their long-run values (LEVEL_DRIFT)
        self.steps_without_draft = 0
        self.plain_seconds = 0.0  # predicted time of the plain steps since drafting last ran
        self.last_capacity = 0
        self.clocks: dict[int, StepClock] = {}
        self.rows: list[int] | None = None  # the sequences this step drafts for (None: all)
        self.probing = False  # this step is a probe: its rows are drafted to the full depth
        self._prices: StepPrices | None = None
        self._verify_lines: dict[int, tuple[list[float], list[float]]] = {}  # per batch size (prices)
        self._lines_cost: CostModel | None = None  # the cost model they came from
        self.queued: list[tuple] = []  # outcomes not yet learned from (observe)
        self.verdict: Verdict | None = None

    def prices(self, batch_size: int, mean_len: float) -> StepPrices:
        """This step's StepPrices (the clock only moves between steps, so the key changes every step)."""
        clock = self.clock(batch_size)
        r = clock.ratio
        key = (batch_size, mean_len, r["plain"], r["draft"], r["verify"], tuple(clock.shape.items()), clock.uniform > 0,
               id(self.cost))
        if self._prices is None or self._prices.key != key:
            if self._lines_cost is not self.cost:
                self._verify_lines, self._lines_cost = {}, self.cost
            line = self._verify_lines.get(batch_size)
            if line is None:  # the profiled target time is a straight line in the mean context
                # A short forward runs its big matmuls padded to the row count the CPU runs fastest
                # (gemm_rows): at batch 8 here, 10 to 15 tokens cost what 16 do. The profile's grid
                # interpolates between its knots and cannot see that; priced at the padded count, a
                # capacity that lands in such a gap is seen to cost as much as filling it.
                n = np.array([self._padded(batch_size + c) for c in range(batch_size * self.max_depth + 1)])
                at_zero = self.cost.target_time(batch_size, n, 0.0)
                slope = self.cost.target_time(batch_size, n, 1.0) - at_zero
                line = self._verify_lines[batch_size] = (at_zero.tolist(), slope.tolist())
            # A speculative step runs the plain step's forward and more, so it costs at least a plain step
            # plus its extra tokens: with the verify ratio a little under the plain one (a few probes
            # timed in a quiet spell), a step that drafts for one sequence and verifies nothing looked
            # 1% cheaper than a plain step at batch 32, and auto ran such steps (a draft forward and a
            # speculative step's bookkeeping, for nothing). The plain step is priced as depth() and
            # observe_step price it, at its own token count (its padded count, 4 tokens at batch 1,
            # lies between the profile's knots and priced it 11% dearer).
            # Each size of verify at its own bucket's correction (StepClock.shape): on one VM a verify of 1 draft
            # at batch 1 ran at 0.93x its profiled time, of none at 1.0x; one ratio for all of them priced the
            # draft's verification at twice what it cost, and auto verified nothing on a third of its steps
            # where fixed k=1, verifying every draft, was 3.3% faster.
            rv, shape = r["verify"], clock.priced_shape()
            # Until a uniform verify is timed here, the ratio is the ragged ones' (observe_step), and a uniform
            # size not timed yet is priced no dearer than plain steps run: otherwise the full level, which the
            # profile prices best, may never be tried.
            untimed = min(1.0, r["plain"] / rv) if not clock.uniform and clock.counts.get("plain") else 1.0
            verify = [rv * shape.get(verify_bucket(batch_size, c), untimed if c % batch_size == 0 else 1.0)
                      * max(a + mean_len * b, 1e-6) for c, (a, b) in enumerate(zip(*line))]  # see _best_capacity
            plain = r["plain"] * self.cost.target_time(batch_size, batch_size, mean_len)
            floor = plain - verify[0]
            if floor > 0:
                verify = [v + floor for v in verify]
            self._prices = StepPrices(key, self.cost, r["draft"], mean_len, plain, verify)
        return self._prices

    def _padded(self, tokens: int) -> float:
        """A token count -> the row count the target's matmuls run it at (see prices)."""
        plan = self.row_plan
        return float(plan[tokens] if plan and tokens < len(plan) else tokens)

    def clock(self, batch_size: int) -> StepClock:
        """The StepClock of this batch size's range (powers of two). A range seen for the first time
        starts from the ratios of the nearest range timed so far: how loaded the host is now is
        shared by every batch size, and a fresh range's first steps (a run's tail, as requests
        finish) would otherwise be priced as if the host ran exactly as profiled."""
        key = (max(int(batch_size), 1) - 1).bit_length()
        clock = self.clocks.get(key)
        if clock is None:
            clock = self.clocks[key] = StepClock()
            timed = [k for k, c in self.clocks.items() if c.counts]
            if timed:
                clock.ratio = dict(self.clocks[min(timed, key=lambda k: (abs(k - key), k))].ratio)
        return clock

    def persist_to(self, path: Path) -> None:
        """Keep the calibration (and the typical acceptance per depth) beside the cost profile:
        load it now, save it as it learns. A restarted server then neither re-learns the
        estimator nor drafts on the optimistic prior until the per-depth means have decayed."""
        self.state_path = path
        if path.exists():
            state = json.loads(path.read_text())
            self.estimator.load_state(state)
            saved = state.get("level_means", [])[: self.max_depth]
            self.level_means = [float(m) for m in self.estimator.typical_level_means(self.max_depth)]
            for j, m in enumerate(saved):
                self.level_means[j] = float(m)
            for j in range(1, self.max_depth):  # deeper than what was saved: no more than the level above
                self.level_means[j] = min(self.level_means[j], self.level_means[j - 1])
            self.level_baseline = list(self.level_means)

    # --- how deep to draft, and for whom ---------------------------------------------------
    def depth(self, batch: BatchInfo) -> int:
        """0 when even typical drafts would not pay for verification (all of them verified to some
        depth, or the best of one level); else the full depth, which keep_going trims as real draft
        probabilities come in. The drafting may be for only some of the sequences (draft_rows):
        see _drafting_rate.

        While drafting does not pay, a probe drafts now and then to refresh the per-depth
        estimates; each probe that does not turn speculation back on doubles the wait for the
        next (up to 16x), and a probe also waits until it would cost at most PROBE_BUDGET of the
        plain time since the last one. A probe drafts for only PROBE_ROWS sequences, those with
        the least for the draft to catch up on: the per-depth means need a sample, and catching
        up on every running context is what made probes expensive (at 32 requests, reading
        6,000 tokens of prompts cost 2% of a whole run).

        A clear verdict (one kind of step predicted at least REUSE_MARGIN faster) stands for the next
        REUSE_STEPS steps at the same batch size while nothing moves against it, a plain one unless a
        probe falls due (Verdict).
        """
        self.rows, self.probing = None, False
        B, s = batch.batch_size, batch.mean_len
        clock = self.clock(B)
        verdict = self.verdict
        if verdict and verdict.holds(batch):
            if verdict.depth:
                return verdict.depth
            if not self._probe_due(verdict.probe_cost):
                self.steps_without_draft += 1
                self.plain_seconds += verdict.plain_time
                return 0
        self.verdict = None
        r = clock.ratio
        price = self.prices(B, s)
        plain_time = price.plain
        plain = B / plain_time
        lags = (list(batch.lags) if batch.lags  # unknown: spread evenly
                else [(batch.lag_tokens + batch.entering_tokens) / B] * B)
        drafting, rows = self._drafting_rate(batch, lags, price, r["draft"])
        # Whether plain or speculative steps run faster relative to the profile depends on the host's
        # load (which kind it slows more varies: see observe_step), so near a tie the losing kind is timed
        # on this machine, in this range, before it is ruled out, and re-timed now and then while the
        # other keeps winning narrowly (_explore).
        if drafting > plain and self._explore(clock, "plain", plain / drafting):
            return 0
        # Turning drafting back on after plain steps pays the draft's catch-up at once, priced as spread over the
        # output left; near a tie the clocks' noise turned it off again a step later, and the catch-up was paid
        # for nothing (run AJ, c = 16: twice in 30 steps, 500-900 prompt tokens each, about 100 ms a time).
        apart = sum(lag_apart(lags[i]) for i in (range(B) if rows is None else rows))
        paying = clock.plain_run > 0 and apart > 0
        # Re-timing drafting pays the catch-up on every plain step since it last ran (B tokens a step): at c = 32 one
        # re-timing after 64 plain steps read 3,319 tokens, about 0.9% of the run, so it waits for its budget.
        again = r["draft"] * self.cost.catch_up_time(apart) <= REEXPLORE_BUDGET * self.plain_seconds
        if drafting > plain * (1 + SWITCH_MARGIN * paying) or self._explore(clock, "verify", drafting / plain, again):
            self.steps_without_draft = 0
            self.plain_seconds = 0.0
            if drafting > plain:
                self.probe_interval = self.probe_every
            self.rows = rows
            if rows is None and plain < (1 - REUSE_MARGIN) * drafting:
                self.verdict = Verdict(B, self.max_depth, batch.lag_tokens, batch.remaining, plain_time, 0.0,
                                       reuse_steps(1 - plain / drafting, clock.counts.get("verify", 0)))
            return self.max_depth
        # A probe pays its sequences' catch-up: it waits until the plain steps since the last one
        # took 1 / PROBE_BUDGET times as long as it will.
        probe = sorted(range(B), key=lags.__getitem__)[:PROBE_ROWS]
        probe_cost = r["draft"] * (self.cost.catch_up_time(float(sum(lags[i] for i in probe)))
                                   + self.max_depth * self.cost.draft_time(len(probe), s))
        if self._probe_due(probe_cost):
            self.steps_without_draft = 0
            self.plain_seconds = 0.0
            self.probe_interval = min(2 * self.probe_interval, 16 * self.probe_every)
            self.rows, self.probing = (sorted(probe) if len(probe) < B else None), True
            return self.max_depth
        self.steps_without_draft += 1
        self.plain_seconds += plain_time
        if drafting < (1 - REUSE_MARGIN) * plain:
            self.verdict = Verdict(B, 0, batch.lag_tokens, batch.remaining, plain_time, probe_cost,
                                   reuse_steps(1 - drafting / plain, clock.counts.get("plain", 0)))
        return 0

    def _drafting_rate(self, batch: BatchInfo, lags: list[float], price: StepPrices, draft_ratio: float
                       ) -> tuple[float, list[int] | None]:
        """The best predicted rate of a speculative step over typical drafts, and the sequences it
        drafts for (None: all of them).

        Drafting for a sequence first means the draft reading what it has not seen of it: its
        prompt, on its first draft, and every token of a pause in drafting. That is paid once, so it
        is spread over the steps the sequence has left. It is priced per sequence, and the m
        sequences cheapest to catch up on are drafted for, m chosen with the rest: a burst of long
        prompts entering decoding, or sequences that ran plainly for hundreds of tokens, then wait
        with no drafts while the others go on speculating. (Priced for the batch as a whole, such a
        burst once turned drafting off for everyone, and the lag that built up meanwhile kept it
        off: at 8 requests, 6% below fixed k = 1.) A lag the first draft forward absorbs
        (INLINE_CATCH_UP) costs nothing apart. Plain Python, as _best_capacity.
        """
        B = batch.batch_size
        remaining = list(batch.remainings) if batch.remainings else [batch.remaining] * B
        catch_up = [draft_ratio * self.cost.catch_up_time(lag_apart(lag)) for lag in lags]
        means = list(itertools.accumulate(self.level_means))  # expected accepted drafts per sequence, to depth d
        order = sorted(range(B), key=lambda i: catch_up[i] / max(remaining[i], 1.0))
        # the first draft forward over the m cheapest to catch up on (it also reads their short lags), a deeper one
        first = price.draft(np.fromiter(itertools.accumulate(first_forward_tokens(lags[i]) for i in order), float))
        first, deeper = first.tolist(), price.draft(np.arange(1, B + 1)).tolist()
        verify = price.verify
        best, best_m, spread_one = 0.0, B, []
        for d in range(1, self.max_depth + 1):
            total, spread = 0.0, []  # the catch-up per step of the m cheapest, m = 1..B
            for i in order:
                total += catch_up[i] / max(remaining[i] / (1 + means[d - 1]), 1.0)
                spread.append(total)
            spread_one = spread_one or spread  # drafting one level
            for m in range(1, B + 1):
                rate = (B + m * means[d - 1]) / (spread[m - 1] + first[m - 1] + (d - 1) * deeper[m - 1] + verify[m * d])
                if rate > best:
                    best, best_m = rate, m
        # One level, of which select verifies only the best: a typical batch of first drafts, priced
        # the way select prices the real ones. (Verifying all of them undersells drafting where only
        # the confident part pays: at high batch, verified tokens are dear.)
        for n in sorted({best_m, B}):
            fixed = spread_one[n - 1] + first[n - 1]
            rate = _best_capacity(self.estimator.typical_first_estimates(n), B, fixed, verify)[1]
            if rate > best:
                best, best_m = rate, n
        return best, (None if best_m == B else sorted(order[:best_m]))

    @staticmethod
    def _explore(clock: StepClock, loser: str, closeness: float, again: bool = True) -> bool:
        """Run the kind of step predicted to lose by less than EXPLORE_MARGIN (loser: "plain" or "verify";
        closeness: its rate over the winner's) once the winner has been timed EXPLORE_AFTER times here:
        until the loser has been timed EXPLORE_STEPS times, and for one step after every REEXPLORE_AFTER
        of the winner's in a row. Each kind is timed only when it runs, and a kind not yet timed here
        moves as the timed one does, so a host on which the loser runs relatively faster than profiled
        is not seen otherwise. Drafting was left to probes once, as a few drafting steps pay the catch-up
        on every running prompt; but probes draft for two sequences and verified nothing at batch 16,
        where full-level verifies ran at 1.09x the profile and plain steps at 1.16x, and auto decoded
        plainly while fixed k=1 was 1.5% faster (run AG). The catch-up is in the price compared.
        again: whether the loser may be re-timed now (drafting, within REEXPLORE_BUDGET).
        Once begun, the loser's timings are completed while it is within twice the margin: its first
        timing replaces what it was assumed to cost, and one taken in a slow spell ended the exploration
        (run AL, c = 32: a first plain step at 1.25x the profile, against 1.05-1.2x for the plain steps
        timed 20 steps later, and auto drafted those 20 steps where plain decoding was ahead). Drafting's
        are completed within its budget (again): a probe's timing counts as begun, while the catch-up of the
        sequences it did not draft for is still to pay."""
        winner = "verify" if loser == "plain" else "plain"
        run = clock.spec_run if loser == "plain" else clock.plain_run
        timed = clock.counts.get(loser, 0)
        if clock.counts.get(winner, 0) < EXPLORE_AFTER:
            return False
        if 0 < timed < EXPLORE_STEPS:
            return again and closeness >= 1 - 2 * EXPLORE_MARGIN
        return closeness >= 1 - EXPLORE_MARGIN and (timed == 0 or (again and run >= REEXPLORE_AFTER))

    def _probe_due(self, probe_cost: float) -> bool:
        return self.steps_without_draft >= self.probe_interval and self.plain_seconds * PROBE_BUDGET >= probe_cost

    def draft_rows(self, batch: BatchInfo) -> list[int] | None:
        return self.rows

    def observe_step(self, record: StepRecord) -> None:
        """Track how the real steps compare with the profile: plain steps, drafting, and the rest of a
        speculative step. The profile times bare forwards; a speculative step also pays for selection,
        the keep-going decisions, verification bookkeeping and rollback (timed with the rest of the
        step: in the draft's ratio they priced every draft level 0.08-0.14 higher at c = 4 and 8),
        and the machine may have drifted since profiling. All three are measured in the same run, so
        drift common to them cancels in the comparison. Until
        a kind of step has run in this batch-size range, its ratio moves as the measured one does:
        the relative costs it started from (the profile's, or the nearest range's) at the machine's
        current speed, not the profile's absolute ones (which made a fresh range's speculative
        steps look cheap next to plain steps measured on a slower machine). Its first timing here
        replaces that assumption, and the ratio is then the mean of its timings (an EMA after 20): a
        sweep's c = 8 ran plain steps at 1.56x the profile and fixed k=1's speculative steps at 1.13x, and
        with the assumption counted as one timing, a probe's verify moved the ratio only halfway there. A separate draft
        catch-up (the draft reading a prompt, or the tokens of a pause in drafting) is left out
        here: depth() prices it from the profile's per-token cost. A verify is compared with the
        profile at the row count its matmuls ran at, as prices() charges it: compared with the bare
        token count, row padding looked like a slow host and was charged twice (at batch 8, a
        verify ratio of 1.30 where plain steps ran at 1.11, and drafting lost to plain decoding).
        """
        if self.cost is None:
            return
        if self.verdict:
            self.verdict.steps -= 1
        B, s = record.batch_size, record.mean_len
        clock = self.clock(B)
        r = clock.ratio
        clock.plain_run = clock.plain_run + 1 if record.depth == 0 else 0
        clock.spec_run = clock.spec_run + 1 if record.depth > 0 else 0
        # A long run of one kind of step leaves the other kind's ratio stale (a few steps timed
        # during a slow or a fast spell must not decide for good), so it drifts toward the ratio
        # being measured, i.e. toward the profile's relative costs, but slowly (RATIO_DRIFT): the
        # host's relative costs are not the profile's, and they move apart. Verifies are matmuls of
        # several rows (compute-bound), plain steps at a small batch matrix-vector products (bound by
        # memory), and a busy host can slow either far more: at c = 1, 2-token verifies ran 30% over
        # their profiled time in one run and 5% in the next while plain steps stayed within 4%; at
        # c = 8, plain steps 5-9% further over profile than verifies. A fast drift (1% a step) erased
        # what was learned within 100 steps, and drafting looked cheap again or barely worth it
        # (same-process A/B against it: c = 1 +0.7 and +3.3%, c = 2 +0.2%, c = 8 +1.8%, c = 16 -0.8%).
        # Speculation is re-timed by probes while drafting is paused, plain decoding every
        # REEXPLORE_AFTER speculative steps near a tie.
        if clock.plain_run > 16:
            for kind in ("draft", "verify"):
                r[kind] += RATIO_DRIFT * (r["plain"] - r[kind])
            for j, m in enumerate(self.level_baseline):  # likewise the per-depth means (LEVEL_DRIFT)
                self.level_means[j] += LEVEL_DRIFT * (m - self.level_means[j])
        if clock.spec_run > 16:
            r["plain"] += RATIO_DRIFT * (r["verify"] - r["plain"])
        if record.depth == 0:
            parts = [("plain", record.seconds, self.cost.target_time(B, record.tokens, s))]
        else:
            parts = [("draft", record.draft_seconds, self.cost.drafting_time(record)),
                     ("verify", record.seconds - record.draft_seconds - record.catch_up_seconds,
                      self.cost.target_time(B, self._padded(record.tokens), s))]
        source = "plain" if record.depth == 0 else "verify"
        before, timed = r[source], {}
        size = verify_bucket(B, record.tokens - B)
        # Once a uniform verify (the same number of drafts for every sequence) has been timed, only uniform
        # ones move the verify ratio: the profile times such forwards, and prices ragged ones between them,
        # sometimes well off. With every verify in the ratio, the sizes auto chose (at batch 4, 5-7 tokens at
        # 1.03-1.2x the profile) set it, the full level (8 tokens at 0.99-1.08x, fixed k=1's) was priced as
        # dear and never tried, and auto decoded plainly on 120 of 189 steps where fixed k=1 was 1.9% ahead
        # (run AP). A ragged verify then teaches its own size's correction only, and when a uniform one moves
        # the ratio the ragged sizes' corrections are rescaled so that their prices stand.
        ragged = record.tokens % B != 0
        for kind, measured, predicted in parts:
            n = clock.counts.get(kind, 0)
            ratio = min(max(measured / predicted, 0.25), 8.0)
            if n:  # a stall of the host (one step at 10-25x its usual time) moves the ratio by at most SPIKE
                spike = SPIKE if n < SETTLED else SPIKE_SETTLED
                expected = r[kind] * (clock.shape.get(size, 1.0) if kind == "verify" else 1.0)
                ratio = min(max(ratio, expected / spike), spike * expected)
            clock.counts[kind], timed[kind] = n + 1, ratio
            if kind == "verify":
                if ragged and clock.uniform:  # its own size's correction only (below)
                    continue
                if not ragged:
                    n, clock.uniform = clock.uniform, clock.uniform + 1
            weight = max(1 / SETTLED, 1.0 / (n + 1))  # the mean of the timings here; the prior only until the first
            old, r[kind] = r[kind], (1 - weight) * r[kind] + weight * ratio
            if kind == "verify" and not ragged:
                for b in clock.shape:
                    if not uniform_bucket(b, B):
                        clock.shape[b] *= old / r[kind]
        if record.depth:  # this verify's size against the verify ratio
            n = clock.shape_counts.get(size, 0)
            weight = max(1 / SETTLED, 1.0 / (n + 1 + SHAPE_PRIOR))
            step = clock.counts["verify"]  # speculative steps timed in this range, this one included
            for b, x in clock.shape.items():  # sizes not timed for a while drift back toward the ratio
                if step - clock.shape_timed[b] > 16:
                    clock.shape[b] = x + SHAPE_DRIFT * (1.0 - x)
            clock.shape_timed[size] = step
            clock.shape[size] = (1 - weight) * clock.shape.get(size, 1.0) + weight * timed["verify"] / r["verify"]
            clock.shape_counts[size] = n + 1
        for kind in r.keys() - clock.counts.keys():  # not timed here yet: moves as the timed kind did
            r[kind] *= r[source] / before

    def _running_estimates(self, logprobs: torch.Tensor) -> tuple[list[list[float]], list[list[float]]]:
        """Draft probabilities q [B][j] and the running products of their estimates along each draft:
        the estimated probability that each token is accepted (0 past where a row stopped drafting, and
        for a row that was not drafted: log-confidence -inf, see Proposal.scatter). Lists, see
        _best_capacity."""
        q = [[math.exp(x) for x in row] for row in logprobs.tolist()]
        cum = []
        for probs, estimates in zip(q, self.estimator.estimate_drafts(q)):
            running, row = 1.0, []
            for x, e in zip(probs, estimates):
                running = running * e if x > 0 else 0.0
                row.append(running)
            cum.append(row)
        return q, cum

    def keep_going(self, batch: BatchInfo):
        """Draft one more level when its expected worth beats its cost. Stopping now gives the best
        rate R over what is drafted; a next-level token of estimate v can then be verified for a
        marginal time dt, which pays when v > R * dt, so the level is worth E[sum max(0, v - R * dt)]
        tokens, against R * (its draft time) tokens that forward costs. v is the request's running
        product times the next token's estimate, whose q follows the counted moves from the last one.
        A request whose next token could not pay even at the best estimate of its position stops
        here (its expected worth is 0), so the level is drafted, and paid for, only for the others.
        The drafts may be of only some of the batch (draft_rows); a probe drafts its rows to the full
        depth, to sample every level.
        """
        if self.probing:
            return None
        B = batch.batch_size
        price = self.prices(B, batch.mean_len)  # the clock moves only between steps
        first = price.draft(self._first_forward_tokens(batch, self.rows))

        def decide(logprobs: torch.Tensor) -> list[bool]:  # [rows drafted for, j] drafted so far
            m, j = logprobs.shape
            q, cum = self._running_estimates(logprobs)
            capacity, rate = _best_capacity([c for row in cum for c in row], B, first + (j - 1) * price.draft(m),
                                            price.verify)
            # marginal verify time per token over the next m tokens (a whole next level)
            threshold = rate * (price.verify[capacity + m] - price.verify[capacity]) / m
            best = self.estimator.best_estimate(j)
            rows = [i for i in range(m) if cum[i][-1] * best > threshold]
            keep = [False] * m
            if rows:  # the others' next tokens cannot pay: they add nothing to the worth
                worth = self.estimator.expected_next_gain([q[i][-1] for i in rows], [cum[i][-1] for i in rows], j,
                                                          threshold)
                if worth > rate * price.draft(len(rows)):
                    for i in rows:
                        keep[i] = True
            return keep

        return decide

    # --- which drafts to verify ----------------------------------------------------------
    def select(self, draft_logprobs: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        B, K = draft_logprobs.shape
        q, cum = self._running_estimates(draft_logprobs)
        rows = [i for i, p in enumerate(q) if p[0] > 0]  # rows a probe left out have q = 0 (Proposal.scatter)
        drafted = [cum[i] for i in rows]
        weight = LEVEL_WEIGHT * min(len(drafted), LEVEL_ROWS) / LEVEL_ROWS
        for j in range(K):
            m = sum(row[j] for row in drafted) / len(drafted)
            self.level_means[j] += weight * (m - self.level_means[j])
            self.level_baseline[j] += weight / 10 * (m - self.level_baseline[j])
        if K < self.max_depth:
            self._project_levels(K)
        price = self.prices(B, batch.mean_len)
        scores = [cum[n % B][n // B] for n in range(B * K)]  # position-major, as tetris_select ranks
        drafting = price.draft(self._first_forward_tokens(batch, rows)) + (K - 1) * price.draft(len(drafted))
        capacity, _ = _best_capacity(scores, B, drafting, price.verify)
        self.last_capacity = capacity
        # the same stable order as tetris_select: prefixes, ties to shallow
        lengths = [0] * B
        for n in sorted(range(B * K), key=lambda n: -scores[n])[:capacity]:
            lengths[n % B] += 1
        return torch.tensor(lengths)

    @staticmethod
    def _first_forward_tokens(batch: BatchInfo, rows: list[int] | None) -> float:
        """Query tokens of this step's first draft forward over `rows` (None: all); short lags unknown: none."""
        if not batch.lags:
            return float(batch.batch_size if rows is None else len(rows))
        lags = batch.lags if rows is None else [batch.lags[i] for i in rows]
        return float(sum(first_forward_tokens(lag) for lag in lags))

    def _project_levels(self, drafted: int) -> None:
        """Levels past the deepest drafted have no fresh means of their own: the estimator's projection
        stands in (at once when lower, by the EMA when higher), never above the level before. Left at
        their prior, they kept drafting worth it on a host where one level did not pay (an H200 at
        batch 64: a cumulative 0.47 at depth 2 against 0.38 at depth 1, and every step drafted)."""
        projected = self.estimator.typical_level_means(self.max_depth)
        for j in range(drafted, self.max_depth):
            m = float(projected[j])
            m = m if m < self.level_means[j] else 0.9 * self.level_means[j] + 0.1 * m
            self.level_means[j] = min(m, self.level_means[j - 1])

    def observe(self, proposal_logprobs: torch.Tensor, lengths: list[int], accepted: list[int]) -> None:
        """Outcomes are queued and learned from LEARN_EVERY steps at a time (WARMUP_LEARN_EVERY while the
        estimator warms up): the same numpy calls run back to back on warm caches instead of once after
        every forward (see StepPrices). Every 8 steps, learning was a fifth of auto's host time at batch 2."""
        self.queued.append((proposal_logprobs, lengths, accepted))
        if len(self.queued) >= (LEARN_EVERY if self.estimator.seen >= self.estimator.warmup else WARMUP_LEARN_EVERY):
            self.learn()

    def learn(self) -> None:
        """Learn from the queued outcomes now (also done before the calibration is read)."""
        queued, self.queued = self.queued, []
        if not queued:
            return
        before = self.estimator.seen
        # the steps' drafts as one [sum of B, deepest K] block, shallower drafts padded with q = 0 (not drafted)
        K = max(logprobs.shape[1] for logprobs, _, _ in queued)
        probs = np.exp(_array(torch.cat([torch.nn.functional.pad(logprobs.float(), (0, K - logprobs.shape[1]),
                                                                 value=-math.inf) for logprobs, _, _ in queued])))
        lengths = np.concatenate([np.asarray(lengths) for _, lengths, _ in queued])
        accepted = np.concatenate([np.asarray(accepted) for _, _, accepted in queued])
        self.estimator.count_transitions(probs[probs[:, 0] > 0])  # rows not drafted have q = 0
        pos = np.arange(K)
        rows, cols = np.nonzero(pos[None, :] < np.minimum(lengths, accepted + 1)[:, None])  # prefix accepted
        self.estimator.update(probs[rows, cols], cols, cols < accepted[rows])
        if self.state_path and self.estimator.seen // 1000 != before // 1000:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            self.state_path.write_text(json.dumps({**self.estimator.state(), "level_means": self.level_means}))

    def calibration(self) -> dict:
        self.learn()
        out = self.estimator.reliability()
        out["last_capacity"] = self.last_capacity
        return out

"""Profiled step-time model: how long a verify forward and a draft forward take.

A target (verify) forward over B sequences with T query tokens in all (T / B per sequence)
costs grid(B, T / B) + a * B * ctx + b * T * ctx, ctx the mean context length: grid is
interpolated bilinearly between profiled batch sizes and query lengths, the B * ctx term is
the KV cache each sequence reads once, the T * ctx term the attention scores. Tokens alone do
not say what a step costs: 40 tokens as 8 sequences x 5 are far cheaper than 32 sequences x 1
plus 8 drafts, because every sequence brings its own cache reads and bookkeeping, so a model
in tokens alone can see verification of extra drafts as free at a batch where it is not. On a
CPU, or a GPU at small batch, the first few extra query tokens per sequence are nearly free
(memory-bound) and later ones cost full price, which the grid follows. One draft forward is
g(B) + d * B * ctx, g piecewise linear. A few dozen timed forwards at start-up are enough; the
fit is cached on disk, keyed by model, device and dtype.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from statistics import median_high
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from tetrispec.model.gemm_rows import saved_plans
from tetrispec.model.model_runner import ForwardItem, ModelRunner

FORMAT = 8  # bumped when the saved fields, or how the timed forwards run, change: an older cached profile is rebuilt

logger = logging.getLogger(__name__)


def host_fingerprint(device: torch.device) -> str:
    """The machine a profile's timings belong to: the GPU's name, or the CPU's model, core count and
    last-level cache, with torch's version and thread count. Step times and row plans are the host's:
    the dev VM changed under a committed profile between two sessions (480 MB L3 to 260 MB, the same
    model name), and a profile made on the first mispriced every step on the second."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    try:
        l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        l3 = "?"
    cpu = " ".join(fields.get(k, "?") for k in ("model name", "cpu family", "model", "stepping"))
    return f"cpu {cpu}; {os.cpu_count()} cores; L3 {l3}; torch {torch.__version__}; {torch.get_num_threads()} threads"


class StepRecord(NamedTuple):
    """One decode step as the engine ran it (LLMEngine.step_trace)."""

    batch_size: int
    tokens: int  # target query tokens: B + selected drafts
    depth: int  # draft forwards run
    mean_len: float  # mean context per sequence
    seconds: float  # wall time of the step, draft catch-up included
    draft_seconds: float = 0.0  # of which the draft forwards (K levels, short catch-ups inline, no decisions)
    catch_up_seconds: float = 0.0  # of which a separate draft catch-up over long lags (prompts, pauses)
    catch_up_tokens: int = 0  # tokens that catch-up fed to the draft
    draft_rows: float = 0.0  # sequences per draft forward (mean over the levels); 0: the whole batch
    draft_tokens: tuple[int, ...] = ()  # query tokens of each draft forward (Proposal.level_tokens); (): unknown


def _segment(knots: list[float], x: float) -> tuple[int, int, float]:
    """Indices of the two knots around x and x's weight on the second; outside the knots the end
    segment is extended (weight below 0 or above 1)."""
    if len(knots) == 1:
        return 0, 0, 0.0
    i = min(max(bisect.bisect_left(knots, x), 1), len(knots) - 1)
    return i - 1, i, (x - knots[i - 1]) / (knots[i] - knots[i - 1])


def _interp(knots: list[float], values, x):
    """Piecewise-linear values at x (a float, or an array of points -> a float64 array), extended
    along the end segments. Arrays go through numpy: a step's capacity choice evaluates a curve
    at a hundred points several times, where torch's per-call overhead would dominate."""
    if isinstance(x, (int, float)):
        i0, i1, w = _segment(knots, float(x))
        return values[i0] + (values[i1] - values[i0]) * w
    xt = np.asarray(x, dtype=np.float64)
    ys = np.asarray(values, dtype=np.float64)
    if len(knots) == 1:
        return np.full_like(xt, ys[0])
    xs = np.asarray(knots, dtype=np.float64)
    i = np.searchsorted(xs[1:-1], xt) + 1  # the segment's right knot, end segments extended
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (xt - xs[i - 1]) / (xs[i] - xs[i - 1])


def _at_least_a_microsecond(t):
    """A predicted time (float or array) kept positive: rates divide by it."""
    return np.maximum(t, 1e-6) if isinstance(t, np.ndarray) else max(t, 1e-6)


@dataclass
class PiecewiseLinear:
    """y = interp(x over knots) + slope_ctx * x * ctx (x: batch size of a draft forward)."""

    knots: list[float]
    values: list[float]
    slope_ctx: float

    def __call__(self, x, ctx):
        return _at_least_a_microsecond(_interp(self.knots, self.values, x) + self.slope_ctx * x * ctx)


@dataclass
class VerifyGrid:
    """Target forward time over (batch size, query tokens per sequence) knots, plus context terms."""

    batches: list[float]
    query_lens: list[float]
    values: list[list[float]]  # [batch knot][query-length knot], at context 0
    slope_seq_ctx: float  # seconds per sequence per context token (its cache read)
    slope_token_ctx: float  # seconds per query token per context token (its scores)
    # [batch knot][query-length knot but the last]: one token past each knot, B * q + 1 query tokens
    # (one sequence verifying one more), at context 0. On a CPU the first row past a multiple of the
    # BLAS's row block costs a step (at batch 8 on the dev VM: 8 tokens 55 ms, 9 tokens 62, 16 tokens
    # 68; 16 tokens 75 ms in a run, 17 tokens 84), which a line between knots puts at a fraction of
    # its height: it priced a 17th token nearly free, and auto drafted and verified a second level at
    # batch 8 that cost more than it brought. None: no such knots (interpolated between the grid's).
    plus_one: list[list[float]] | None = None

    def __call__(self, batch_size: float, num_tokens, ctx: float):
        """num_tokens: a float, or an array (or CPU tensor) of token counts at this batch size."""
        b = float(batch_size)
        if isinstance(num_tokens, (int, float)):  # a line in ctx, kept per (b, num_tokens): see _line
            at_zero, per_ctx = self._line(b, float(num_tokens))
            return max(at_zero + per_ctx * ctx, 1e-6)
        num_tokens = np.asarray(num_tokens, dtype=np.float64)
        knots, row = self._curve(b)
        return _at_least_a_microsecond(_interp(knots, row, num_tokens / b) + self.slope_seq_ctx * b * ctx
                                       + self.slope_token_ctx * num_tokens * ctx)

    def _line(self, b: float, n: float) -> tuple[float, float]:
        """One forward's time at context 0 and per context token. Kept, like _curve, outside the
        fields (not saved; a grid's fields are not changed after it is made): auto's per-step
        bookkeeping prices the same few shapes every step, and right after a forward each Python
        call costs many times what it does on warm caches."""
        lines = self.__dict__.setdefault("_lines", {})
        key = (b, n)
        if key not in lines:
            if len(lines) >= 4096:  # many shapes seen (a long run over many batch sizes): start afresh
                lines.clear()
            knots, row = self._curve(b)
            lines[key] = (_interp(knots, row, n / b), self.slope_seq_ctx * b + self.slope_token_ctx * n)
        return lines[key]

    def _curve(self, b: float) -> tuple[list[float], list[float]]:
        """The query-length knots and values at batch size b, kept per batch size (see _line)."""
        curves = self.__dict__.setdefault("_curves", {})
        if b not in curves:
            i0, i1, w = _segment(self.batches, b)
            row = [v0 + (v1 - v0) * w for v0, v1 in zip(self.values[i0], self.values[i1])]
            curves[b] = (self._with_plus_one(b, i0, i1, w, row) if self.plus_one is not None
                         else (self.query_lens, row))
        return curves[b]

    def _with_plus_one(self, b: float, i0: int, i1: int, w: float, row: list[float]) -> tuple[list[float], list]:
        """The query-length knots and the row with a knot one token past each (q + 1 / B) inserted where
        it falls strictly between two knots, its value kept between theirs."""
        knots, values = [self.query_lens[0]], [row[0]]
        for j in range(1, len(self.query_lens)):
            q = self.query_lens[j - 1] + 1.0 / b
            if q < self.query_lens[j]:
                value = self.plus_one[i0][j - 1] + (self.plus_one[i1][j - 1] - self.plus_one[i0][j - 1]) * w
                knots.append(q)
                values.append(min(max(value, row[j - 1]), row[j]))
            knots.append(self.query_lens[j])
            values.append(row[j])
        return knots, values


@dataclass
class CostModel:
    target: VerifyGrid  # one target forward: batch size and query tokens
    draft: PiecewiseLinear  # over batch size, one draft forward
    # seconds per token of a draft catch-up forward (the draft reading a prompt, or the tokens of a
    # pause in drafting): every speculation method pays it once per token the draft has not seen
    draft_prefill: float = 0.0
    # the CPU row plans the forwards were timed under, {"target": ..., "draft": ...} (gemm_rows.saved_plans);
    # an engine that loads the profile runs its matmuls under them (LLMEngine.set_speculation)
    row_plans: dict | None = None
    host: str = ""  # host_fingerprint of the machine it was timed on ("": unknown, taken as this one)

    @classmethod
    def linear(cls, fixed: float, per_token: float, per_token_ctx: float = 0.0, draft_fixed: float = 0.0,
               draft_per_seq: float = 0.0, draft_per_seq_ctx: float = 0.0, draft_prefill: float = 0.0) -> CostModel:
        """A straight line in tokens, whatever the batch (tests, and users who know their hardware).
        The grid interpolates b * q exactly, so fixed + per_token * T holds everywhere."""
        values = [[fixed + per_token * b * q for q in (1.0, 2.0)] for b in (1.0, 2.0)]
        return cls(VerifyGrid([1.0, 2.0], [1.0, 2.0], values, 0.0, per_token_ctx),
                   PiecewiseLinear([0.0, 1.0], [draft_fixed, draft_fixed + draft_per_seq], draft_per_seq_ctx),
                   draft_prefill)

    def target_time(self, batch_size: int, num_tokens, mean_len: float):
        """Seconds of one target forward: batch_size sequences, num_tokens query tokens in all
        (a float, or an array of counts at the same batch size -> an array)."""
        return self.target(batch_size, num_tokens, mean_len)

    def draft_time(self, batch_size: float, mean_len: float) -> float:
        """One draft forward over the batch."""
        return self.draft(batch_size, mean_len)

    def drafting_time(self, record: StepRecord) -> float:
        """The draft forwards of a step as the profile prices them: each at its query tokens, which the
        profile's draft curve (one token per sequence) prices as that many sequences. The first forward also
        reads every request's short lag, up to twice the rows of the others: priced at the rows drafted for,
        it ran 1.45x the profile at c = 8 where the deeper ones ran 1.12x, and one draft ratio learned from
        both charged a second level 30% over its cost."""
        if record.draft_tokens:
            return sum(self.draft_time(t, record.mean_len) for t in record.draft_tokens)
        return record.depth * self.draft_time(record.draft_rows or record.batch_size, record.mean_len)

    def catch_up_time(self, num_tokens: float) -> float:
        """The draft reading num_tokens it has not seen (long queries: a per-token cost)."""
        return num_tokens * self.draft_prefill

    def step_time(self, batch_size: int, mean_len: float, k: int) -> float:
        """A step that drafts k per request and verifies all of them (k = 0: plain decode)."""
        return (self.target_time(batch_size, batch_size * (k + 1), mean_len)
                + k * self.draft_time(batch_size, mean_len))

    def replay(self, trace: list[StepRecord]) -> float:
        """Predicted seconds of a run's decode steps (LLMEngine.step_trace): the same steps timed
        by the profile instead of the clock, which compares methods free of machine noise."""
        return sum(self.target_time(r.batch_size, r.tokens, r.mean_len) + self.drafting_time(r)
                   + self.catch_up_time(r.catch_up_tokens) for r in trace)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostModel | None:
        """The saved model, or None when the file holds an older format."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            return None
        return cls(VerifyGrid(**d["target"]), PiecewiseLinear(**d["draft"]), d["draft_prefill"], d["row_plans"],
                   d.get("host", ""))

    @classmethod
    def load_current(cls, path: str | Path, device: torch.device) -> CostModel | None:
        """The saved model if it is current: this format, and timed on this host (or on an unnamed one)."""
        cost = cls.load(path) if Path(path).exists() else None
        here = host_fingerprint(device)
        if cost is not None and cost.host and cost.host != here:
            logger.warning("step-time profile %s was made on another host (%s; this is %s): re-profiling",
                           path, cost.host, here)
            return None
        return cost


def _items(runner: ModelRunner, batch: int, ctx: int, q_len: int, extra: int = 0) -> list[ForwardItem]:
    """`batch` sequences, q_len new tokens each at context ctx (the first `extra` more), in disjoint cache blocks."""
    blocks_each = -(-(ctx + q_len + 1) // runner.block_size)
    return [ForwardItem([1] * (q_len + (i < extra)), ctx, list(range(i * blocks_each, (i + 1) * blocks_each)))
            for i in range(batch)]


def _time_forward(runner: ModelRunner, batch: int, ctx: int, q_len: int, repeats: int,
                  logits_for: str = "all", before=None, extra: int = 0) -> float:
    """Median seconds of one forward: `batch` sequences, q_len new tokens each at context ctx (the
    first `extra` sequences one more). before(), untimed, runs ahead of each timed forward (the draft
    is timed after a target forward)."""
    items = _items(runner, batch, ctx, q_len, extra)
    runner.forward(items, logits_for)  # warm-up
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        runner.forward(items, logits_for)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return median_high(times)


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Pool-adjacent-violators: the non-decreasing fit closest to values (weighted L2)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for v, _, n in blocks:
        out.extend([v] * n)
    return out


def _lstsq_nonneg_tail(cols: torch.Tensor, y: torch.Tensor, tail: int) -> torch.Tensor:
    """Least squares whose last `tail` coefficients (the context slopes) may not be negative:
    a slope that comes out negative is pinned at 0 and the rest refitted."""
    keep = list(range(cols.shape[1]))
    while True:
        coef = torch.zeros(cols.shape[1], dtype=torch.float64)
        coef[keep] = torch.linalg.lstsq(cols[:, keep], y).solution.squeeze(1)
        negative = [j for j in keep[len(keep) - tail:] if coef[j] < 0] if tail else []
        if not negative:
            return coef
        keep.remove(negative[0])
        tail -= 1


def fit_piecewise(xs: list[float], ctxs: list[float], ys: list[float]) -> PiecewiseLinear:
    """Least squares of one value per distinct x (the knots) plus a shared x * ctx slope.

    The knot values are then made non-decreasing (more sequences never cost less) and the
    context slope kept non-negative: timing noise must not invent free capacity.
    """
    knots = sorted(set(xs))
    x = torch.tensor(xs, dtype=torch.float64)
    onehot = (x[:, None] == torch.tensor(knots, dtype=torch.float64)[None, :]).double()
    cols = torch.cat([onehot, (x * torch.tensor(ctxs, dtype=torch.float64))[:, None]], 1)
    coef = _lstsq_nonneg_tail(cols, torch.tensor(ys, dtype=torch.float64)[:, None], 1)
    slope = float(coef[-1])
    counts = [xs.count(v) for v in knots]
    return PiecewiseLinear([float(v) for v in knots], isotonic(coef[: len(knots)].tolist(), counts), slope)


def fit_grid(batches: list[float], query_lens: list[float], ctxs: list[float], ys: list[float]) -> VerifyGrid:
    """Least squares of one value per (batch, query length) cell plus the two context slopes.

    The cell values are then made non-decreasing along both axes (more sequences or more
    tokens never cost less) and the slopes kept non-negative: timing noise must not invent
    free capacity.
    """
    bk, qk = sorted(set(batches)), sorted(set(query_lens))
    b = torch.tensor(batches, dtype=torch.float64)
    q = torch.tensor(query_lens, dtype=torch.float64)
    c = torch.tensor(ctxs, dtype=torch.float64)
    cell = torch.tensor([bk.index(bi) * len(qk) + qk.index(qi) for bi, qi in zip(batches, query_lens)])
    onehot = torch.nn.functional.one_hot(cell, len(bk) * len(qk)).double()
    cols = torch.cat([onehot, (b * c)[:, None], (b * q * c)[:, None]], 1)
    coef = _lstsq_nonneg_tail(cols, torch.tensor(ys, dtype=torch.float64)[:, None], 2)
    counts = torch.bincount(cell, minlength=len(bk) * len(qk)).double().view(len(bk), len(qk))
    values = coef[:-2].view(len(bk), len(qk))
    # an unmeasured cell (the profile grid skips what the cache cannot hold) copies its neighbour below
    for i in range(len(bk)):
        for j in range(len(qk)):
            if counts[i, j] == 0:
                values[i, j] = values[i, j - 1] if j else (values[i - 1, j] if i else 0.0)
    weights = counts.clamp_min(1e-3)
    for _ in range(3):  # alternate the two monotone projections until they agree
        values = torch.tensor([isotonic(r.tolist(), w.tolist()) for r, w in zip(values, weights)])
        values = torch.tensor([isotonic(r.tolist(), w.tolist()) for r, w in zip(values.t(), weights.t())]).t()
    return VerifyGrid([float(x) for x in bk], [float(x) for x in qk], values.tolist(), float(coef[-2]),
                      float(coef[-1]))


CATCH_UP_PROBE = 256  # tokens per sequence of the timed draft catch-up


def profile(target: ModelRunner, draft: ModelRunner | None, max_batch: int, max_k: int,
            num_slots: int, repeats: int = 3, rounds: int = 3, progress: bool = True) -> CostModel:
    """Time the target over batch sizes x query lengths x contexts, and the draft over batch sizes x
    contexts, on a grid that fits in `num_slots` cache slots.

    Every shape is timed in each of `rounds` passes over the whole grid (`repeats` forwards a pass),
    and the median of its passes is kept: in one pass each shape's timing is taken at one moment, so
    a slow spell on the host bends the curves at whichever shapes ran during it, and auto's
    plain-or-verify choice at those batch sizes with them. The profile also keeps the row plans its
    forwards ran under (gemm_rows.saved_plans), which an engine that loads it adopts.

    Must run while the caches hold no live sequence (at engine start-up).
    """
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch})
    ctxs = [64, 256, 768]
    ks = sorted({0, 1, 2, max(1, max_k // 2), max_k})
    grid = [(b, c, k) for b in batches for c in ctxs for k in ks if b * (c + k + 1 + 16) <= num_slots]
    if not grid:
        raise ValueError("KV cache too small to profile the step-time model")
    # B * q + 1 tokens at each knot but the last query length (one sequence verifying one more), at the
    # middle context. Where that is a grid knot already (batch 1), or the cache cannot hold it, the knot
    # keeps the grid's own line there instead of a timing.
    ctx = ctxs[1]
    plus_shapes = [(b, k + 1) for b in batches for k, k_next in zip(ks, ks[1:])
                   if k + 1.0 / b < k_next and b * (ctx + k + 3 + 16) <= num_slots]
    drafts = [(b, c) for b, c, k in grid if k == 0] if draft is not None else []
    target_t: dict[tuple, list[float]] = {shape: [] for shape in grid}
    draft_t: dict[tuple, list[float]] = {shape: [] for shape in drafts}
    plus_t: dict[tuple, list[float]] = {shape: [] for shape in plus_shapes}
    bar = tqdm(total=rounds * (len(grid) + len(drafts) + len(plus_shapes)), desc="profiling step times",
               disable=not progress)
    for _ in range(rounds):
        for b, c, k in grid:
            target_t[b, c, k].append(_time_forward(target, b, c, k + 1, repeats))
            bar.update()
        for b, c in drafts:
            # In a step the draft runs right after the target's forward, which has pushed the draft's
            # weights and cache out of the CPU caches (3.2 ms against 1.9 ms warm at batch 1 on the dev VM): time it so.
            target_items = _items(target, b, c, 1)
            draft_t[b, c].append(_time_forward(draft, b, c, 1, repeats,
                                               before=partial(target.forward, target_items, "last")))
            bar.update()
        for b, q in plus_shapes:
            plus_t[b, q].append(_time_forward(target, b, ctx, q, repeats + 2, extra=1))
            bar.update()
    bar.close()
    verify = fit_grid([b for b, _, _ in grid], [k + 1 for _, _, k in grid], [c for _, c, _ in grid],
                      [median_high(target_t[shape]) for shape in grid])
    plus_one = []
    for i, b in enumerate(verify.batches):
        plus_one.append([])
        for q in verify.query_lens[:-1]:
            times = plus_t.get((int(b), int(q)))
            if not times:
                plus_one[i].append(float(_interp(verify.query_lens, verify.values[i], q + 1.0 / b)))
                continue
            tokens = b * q + 1
            context_part = verify.slope_seq_ctx * b * ctx + verify.slope_token_ctx * tokens * ctx
            plus_one[i].append(median_high(times) - context_part)
    verify = replace(verify, plus_one=plus_one)  # a new grid: what a grid keeps (_line) holds for its fields as made
    plans, host = {"target": saved_plans(target.model)}, host_fingerprint(target.device)
    if draft is None:
        return CostModel(verify, PiecewiseLinear([1.0], [0.0], 0.0), row_plans=plans, host=host)
    plans["draft"] = saved_plans(draft.model)
    # a catch-up forward as the proposer runs it: long queries, no logits
    prefill = 0.0
    if 2 * (CATCH_UP_PROBE + 16) <= num_slots:
        prefill = _time_forward(draft, 2, 0, CATCH_UP_PROBE, rounds * repeats, logits_for="none") / (2 * CATCH_UP_PROBE)
    return CostModel(verify, fit_piecewise([b for b, _ in drafts], [c for _, c in drafts],
                                           [median_high(draft_t[shape]) for shape in drafts]), prefill, plans, host)


def load_or_profile(path: Path, target: ModelRunner, draft: ModelRunner | None, max_batch: int,
                    max_k: int, num_slots: int) -> CostModel:
    cached = CostModel.load_current(path, target.device)
    if cached is not None:
        return cached
    cost = profile(target, draft, max_batch, max_k, num_slots)
    cost.save(path)
    return cost

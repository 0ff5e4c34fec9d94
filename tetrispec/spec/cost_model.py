"""Profiled step-time model: how long a verify forward and a draft forward take.

Target (verify) time is f(tokens) + a * tokens * ctx, where tokens are the query tokens of
the step, ctx the mean context length (attention reads the cache) and f is piecewise linear
between profiled token counts. A straight line does not do: on a CPU, or a GPU at small
batch, a forward is memory-bound until enough tokens share each weight read, so the first
few extra tokens are almost free and later ones cost full price. One draft forward is
g(B) + d * B * ctx in the same way. A few dozen timed forwards at start-up are enough; the
fit is cached on disk, keyed by model, device and dtype.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from tetrispec.model.model_runner import ForwardItem, ModelRunner

FORMAT = 2  # bumped when the saved fields change; an older cached profile is rebuilt


class StepRecord(NamedTuple):
    """One decode step as the engine ran it (LLMEngine.step_trace)."""

    batch_size: int
    tokens: int  # target query tokens: B + selected drafts
    depth: int  # draft forwards run
    mean_len: float  # mean context per sequence
    seconds: float  # wall time of the step, draft catch-up included
    draft_seconds: float = 0.0  # of which the draft forwards (K levels, short catch-ups inline)
    catch_up_seconds: float = 0.0  # of which a separate draft catch-up over long lags (prompts, pauses)


@dataclass
class PiecewiseLinear:
    """y = interp(x over knots) + slope_ctx * x * ctx, extrapolated along the end segments."""

    knots: list[float]
    values: list[float]
    slope_ctx: float

    def __call__(self, x, ctx):
        xs = torch.tensor(self.knots, dtype=torch.float64)
        ys = torch.tensor(self.values, dtype=torch.float64)
        xt = torch.as_tensor(x, dtype=torch.float64)
        if len(self.knots) == 1:
            base = ys[0].expand_as(xt)
        else:
            i = torch.searchsorted(xs, xt.contiguous()).clamp(1, len(self.knots) - 1)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            base = y0 + (y1 - y0) * (xt - x0) / (x1 - x0)
        out = (base + self.slope_ctx * xt * ctx).clamp_min(1e-6)
        return float(out) if out.dim() == 0 else out


@dataclass
class CostModel:
    target: PiecewiseLinear  # over query tokens of the step
    draft: PiecewiseLinear  # over batch size, one draft forward

    @classmethod
    def linear(cls, fixed: float, per_token: float, per_token_ctx: float = 0.0, draft_fixed: float = 0.0,
               draft_per_seq: float = 0.0, draft_per_seq_ctx: float = 0.0) -> CostModel:
        """A straight-line model (tests, and users who know their hardware)."""
        return cls(PiecewiseLinear([0.0, 1.0], [fixed, fixed + per_token], per_token_ctx),
                   PiecewiseLinear([0.0, 1.0], [draft_fixed, draft_fixed + draft_per_seq], draft_per_seq_ctx))

    def target_time(self, num_tokens, mean_len: float):
        """Seconds of one target forward over num_tokens query tokens (a float or a tensor of counts)."""
        return self.target(num_tokens, mean_len)

    def draft_time(self, batch_size: float, mean_len: float) -> float:
        """One draft forward over the batch."""
        return self.draft(batch_size, mean_len)

    def step_time(self, batch_size: int, mean_len: float, k: int) -> float:
        """A step that drafts k per request and verifies all of them (k = 0: plain decode)."""
        return self.target_time(batch_size * (k + 1), mean_len) + k * self.draft_time(batch_size, mean_len)

    def replay(self, trace: list[StepRecord]) -> float:
        """Predicted seconds of a run's decode steps (LLMEngine.step_trace): the same steps timed
        by the profile instead of the clock, which compares methods free of machine noise."""
        return sum(self.target_time(r.tokens, r.mean_len) + r.depth * self.draft_time(r.batch_size, r.mean_len)
                   for r in trace)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostModel | None:
        """The saved model, or None when the file holds an older format."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            return None
        return cls(PiecewiseLinear(**d["target"]), PiecewiseLinear(**d["draft"]))


def _time_forward(runner: ModelRunner, batch: int, ctx: int, q_len: int, repeats: int) -> float:
    """Median seconds of one forward: `batch` sequences, q_len new tokens each at context ctx."""
    blocks_each = -(-(ctx + q_len) // runner.block_size)
    items = [
        ForwardItem([1] * q_len, ctx, list(range(i * blocks_each, (i + 1) * blocks_each)))
        for i in range(batch)
    ]
    runner.forward(items, "all")  # warm-up
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.forward(items, "all")
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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


def fit_piecewise(xs: list[float], ctxs: list[float], ys: list[float]) -> PiecewiseLinear:
    """Least squares of one value per distinct x (the knots) plus a shared x * ctx slope.

    The knot values are then made non-decreasing (more tokens never cost less) and the
    context slope kept non-negative: timing noise must not invent free capacity.
    """
    knots = sorted(set(xs))
    x = torch.tensor(xs, dtype=torch.float64)
    onehot = (x[:, None] == torch.tensor(knots, dtype=torch.float64)[None, :]).double()
    cols = torch.cat([onehot, (x * torch.tensor(ctxs, dtype=torch.float64))[:, None]], 1)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(cols, y).solution.squeeze(1)
    slope = float(coef[-1])
    if slope < 0:
        slope = 0.0
        coef = torch.linalg.lstsq(onehot, y).solution.squeeze(1)
    counts = [xs.count(v) for v in knots]
    return PiecewiseLinear([float(v) for v in knots], isotonic(coef[: len(knots)].tolist(), counts), slope)


def profile(target: ModelRunner, draft: ModelRunner | None, max_batch: int, max_k: int,
            num_slots: int, repeats: int = 3, progress: bool = True) -> CostModel:
    """Time the target and draft over a grid that fits in `num_slots` cache slots.

    Must run while the caches hold no live sequence (at engine start-up).
    """
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch})
    ctxs = [64, 256, 768]
    ks = sorted({0, 1, 2, max(1, max_k // 2), max_k})
    grid = [(b, c, k) for b in batches for c in ctxs for k in ks if b * (c + k + 1 + 16) <= num_slots]
    if not grid:
        raise ValueError("KV cache too small to profile the step-time model")
    t_x, t_c, t_y, d_x, d_c, d_y = [], [], [], [], [], []
    bar = tqdm(grid, desc="profiling step times", disable=not progress)
    for b, c, k in bar:
        t_x.append(b * (k + 1))
        t_c.append(c)
        t_y.append(_time_forward(target, b, c, k + 1, repeats))
        if draft is not None and k == 0:
            d_x.append(b)
            d_c.append(c)
            d_y.append(_time_forward(draft, b, c, 1, repeats))
    no_draft = PiecewiseLinear([1.0], [0.0], 0.0)
    return CostModel(fit_piecewise(t_x, t_c, t_y), fit_piecewise(d_x, d_c, d_y) if d_x else no_draft)


def load_or_profile(path: Path, target: ModelRunner, draft: ModelRunner | None, max_batch: int,
                    max_k: int, num_slots: int) -> CostModel:
    cached = CostModel.load(path) if path.exists() else None
    if cached is not None:
        return cached
    cost = profile(target, draft, max_batch, max_k, num_slots)
    cost.save(path)
    return cost

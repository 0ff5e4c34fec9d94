"""Profiled step-time model: how long a verify forward and a draft forward take.

Target (verify) time is fitted as c0 + c1 * tokens + c2 * tokens * ctx, where tokens are the
query tokens of the step and ctx the mean context length (attention reads the cache);
one draft forward as d0 + d1 * B + d2 * B * ctx. A few dozen timed forwards at start-up are
enough: least squares over a grid of batch size, context length and tokens per request.
The fit is cached on disk, keyed by model, device and dtype.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tetrispec.model.model_runner import ForwardItem, ModelRunner


@dataclass
class CostModel:
    target_coef: list[float]
    draft_coef: list[float]

    def target_time(self, num_tokens: float, mean_len: float) -> float:
        c = self.target_coef
        return max(1e-6, c[0] + c[1] * num_tokens + c[2] * num_tokens * mean_len)

    def draft_time(self, batch_size: float, mean_len: float) -> float:
        """One draft forward over the batch."""
        d = self.draft_coef
        return max(1e-6, d[0] + d[1] * batch_size + d[2] * batch_size * mean_len)

    def step_time(self, batch_size: int, mean_len: float, k: int) -> float:
        """A step that drafts k per request and verifies all of them (k = 0: plain decode)."""
        return self.target_time(batch_size * (k + 1), mean_len) + k * self.draft_time(batch_size, mean_len)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls(**json.loads(Path(path).read_text()))


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


def _fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    # non-negative-ish least squares: drop a negative slope (noise) and refit
    coef = torch.linalg.lstsq(X, y[:, None]).solution.squeeze(1)
    for j in range(1, X.shape[1]):
        if coef[j] < 0:
            X[:, j] = 0
            coef = torch.linalg.lstsq(X, y[:, None]).solution.squeeze(1)
            coef[j] = 0
    return coef.tolist()


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
    t_rows, t_ys, d_rows, d_ys = [], [], [], []
    bar = tqdm(grid, desc="profiling step times", disable=not progress)
    for b, c, k in bar:
        t_rows.append([1.0, b * (k + 1), b * (k + 1) * c])
        t_ys.append(_time_forward(target, b, c, k + 1, repeats))
        if draft is not None and k == 0:
            d_rows.append([1.0, b, b * c])
            d_ys.append(_time_forward(draft, b, c, 1, repeats))
    draft_coef = _fit(d_rows, d_ys) if d_rows else [0.0, 0.0, 0.0]
    return CostModel(_fit(t_rows, t_ys), draft_coef)


def load_or_profile(path: Path, target: ModelRunner, draft: ModelRunner | None, max_batch: int,
                    max_k: int, num_slots: int) -> CostModel:
    if path.exists():
        return CostModel.load(path)
    cost = profile(target, draft, max_batch, max_k, num_slots)
    cost.save(path)
    return cost

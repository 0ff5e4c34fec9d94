"""Short matmuls run at the row count, and in the operand order, the CPU BLAS is fastest at.

On MKL float32 (the dev VM: AVX-512, 2 cores), a matmul against a large weight costs more with
7-15 rows than with 16: the default target's LM head (49152 x 576) takes 12 ms for 8 rows and
20 ms for 15, but 9 ms for 16, and its gate/up projection shows the same dip; small weights and
bfloat16 (AMX) do not. Decode and verify steps at 2-8 concurrent requests land exactly there, and
a ragged verify of 13 tokens cost more than a uniform one of 16. The order of the operands
matters as much: x @ W^T with 1-4 rows runs as a matrix-vector product or a small-M gemm that
streams the weights at about half the memory bandwidth that W @ x^T gets (one pass over the
default target's weights: 1 row 35 ms either way, 2 rows 61 ms as x @ W^T and 19 ms as W @ x^T,
4 rows 54 and 19 ms), so a single row is padded to a few and run weight-major. Which counts and which
order are fast depends on the BLAS, the CPU and the weight's shape, so it is measured, once per
weight shape and dtype when a model runner starts on CPU, not assumed. It is measured the way a
forward uses the weights: one timing is a pass over every layer's weight of that shape, which
streams them from memory. Timing one weight over and over (it stays in cache) gave plans that
flipped from start to start (the gate/up projection at 13 rows: 30% slower than 16 in cache, 17%
streamed) and left a ragged verify of 13 tokens at 115 ms where 16 took 95.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # row counts above this run as they are
MIN_SAVING = 0.1  # pad or reorder only when the streamed pass is at least this much faster ...
# ... and by at least this much per forward: smaller gaps between counts are timing noise. 0.5 ms kept the
# draft (4 layers of 256) on x @ W^T, where W @ x^T saves 0.1-0.3 ms of a 2-3 ms forward at 2-4 rows (-30%)
MIN_SECONDS = 5e-5
# a profile's saved way is adopted where it costs at most this much more than this start's own (adopt_plans)
ADOPT_TOLERANCE = MIN_SAVING


class RowPlan(NamedTuple):
    """How a Linear runs a short batch: rows[m] is the row count m rows are padded to and
    weight_major[m] whether they run as (W @ x^T)^T (m < len(rows))."""

    rows: tuple[int, ...]
    weight_major: tuple[bool, ...]


def _matmul(x: torch.Tensor, weight: torch.Tensor, weight_major: bool) -> torch.Tensor:
    return torch.mm(weight, x.t()).t().contiguous() if weight_major else F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear that runs a short batch the way its plan says is fastest."""

    row_plan: RowPlan | None = None
    row_times: dict | None = None  # seconds of each way to run a short batch (time_ways), where measured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.row_plan
        if plan is not None and x.dim() == 2 and x.shape[0] < len(plan.rows) and not torch.is_grad_enabled():
            m, rows, weight_major = x.shape[0], plan.rows[x.shape[0]], plan.weight_major[x.shape[0]]
            if rows != m or weight_major:
                if rows != m:
                    padded = x.new_zeros(rows, x.shape[1])
                    padded[:m] = x
                    x = padded
                out = _matmul(x, self.weight, weight_major)[:m]
                return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


Way = tuple[int, bool]  # (row count, weight-major)


def time_ways(weights: list[torch.Tensor], repeats: int = 2) -> dict[Way, float]:
    """Seconds of one timing (a fixed number of passes over all the weights) of every way to run up to
    MAX_ROWS rows: each row count, in each operand order. weights: every weight of one shape and dtype in
    the model, timed as a forward meets them (one pass over all of them)."""
    x = torch.randn(MAX_ROWS, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    ways = [(m, major) for m in range(1, MAX_ROWS + 1) for major in (False, True)]
    times = {way: float("inf") for way in ways}
    with torch.inference_mode():
        start = time.perf_counter()
        for w in weights:  # warm-up, and how many passes make a timing of at least ~2 ms
            F.linear(x, w)
            torch.mm(w, x.t())
        passes = min(max(int(2e-3 / (time.perf_counter() - start + 1e-9)), 1), 64)
        for _ in range(repeats):  # interleaved: a slow moment hits every way alike
            for m, major in ways:
                start = time.perf_counter()
                for _ in range(passes):
                    for w in weights:
                        _matmul(x[:m], w, major)
                times[(m, major)] = min(times[(m, major)], time.perf_counter() - start)
    return {way: t / passes for way, t in times.items()}


def plan_from_times(times: dict[Way, float]) -> RowPlan:
    """The plan for m = 0..MAX_ROWS rows: the cheapest row count >= m and operand order, where it beats m
    rows as x @ W^T by MIN_SAVING and MIN_SECONDS (times: seconds of one pass, time_ways)."""
    rows, weight_major = [0], [False]
    for m in range(1, MAX_ROWS + 1):
        best = min((way for way in times if way[0] >= m), key=times.__getitem__)
        saved = times[(m, False)] - times[best]
        if not (saved > MIN_SAVING * times[(m, False)] and saved > MIN_SECONDS):
            best = (m, False)
        rows.append(best[0])
        weight_major.append(best[1])
    return RowPlan(tuple(rows), tuple(weight_major))


def _by_shape(model: nn.Module, keep) -> dict[tuple, list[Linear]]:
    """The model's Linears for which keep(module) holds, grouped by weight shape and dtype."""
    groups: dict[tuple, list[Linear]] = {}
    for module in model.modules():
        if isinstance(module, Linear) and keep(module):
            groups.setdefault((tuple(module.weight.shape), module.weight.dtype), []).append(module)
    return groups


def heaviest_plan(model: nn.Module) -> tuple[int, ...] | None:
    """The row counts of the plan of the weight shape that holds the most bytes in all (a decoder's
    MLP projection): the row count a forward's matmul time mostly follows."""
    groups = _by_shape(model, lambda m: m.row_plan is not None)
    if not groups:
        return None
    heaviest = max(groups.values(), key=lambda ms: sum(m.weight.numel() * m.weight.element_size() for m in ms))
    return heaviest[0].row_plan.rows


def plan_row_padding(model: nn.Module) -> dict[tuple, RowPlan]:
    """Give every Linear of a CPU model its plan, measuring each distinct weight shape and dtype once
    (a model shared by several runners keeps the plan it got first). The timings stay on the modules
    (row_times): adopt_plans checks a saved plan against them."""
    groups = _by_shape(model, lambda m: m.weight.device.type == "cpu" and m.row_plan is None)
    plans = {}
    for key, modules in groups.items():
        times = time_ways([m.weight.detach() for m in modules])
        plans[key] = plan_from_times(times)
        for m in modules:
            m.row_plan, m.row_times = plans[key], times
    return plans


def _shape_key(key: tuple) -> str:
    (rows, cols), dtype = key
    return f"{rows}x{cols}:{str(dtype).removeprefix('torch.')}"


def saved_plans(model: nn.Module) -> dict[str, list[list]]:
    """The model's plans by weight shape and dtype, as JSON: a step-time profile keeps the plans its
    forwards were timed under (adopt_plans)."""
    return {_shape_key(key): [list(ms[0].row_plan.rows), list(ms[0].row_plan.weight_major)]
            for key, ms in _by_shape(model, lambda m: m.row_plan is not None).items()}


def adopt_plans(model: nn.Module, saved: dict[str, list[list]]) -> None:
    """Run the model's short matmuls as `saved` (saved_plans) says, for the shapes it names, at the row
    counts where that costs at most ADOPT_TOLERANCE more than this start's own plan by its own timings. Where
    the two operand orders are within 10% of each other (8-16 rows on the dev VM) the measured plan
    differs from start to start, and a forward timed under one plan and run under another is mispriced
    by up to that much. But plans are the CPU's: one VM ran 2-4 rows weight-major at a third of the time
    of x @ W^T, the next at twice it, and a profile made on the first ran batch-1 steps 3x slower on the
    second until a saved way clearly slower here was refused."""
    for key, modules in _by_shape(model, lambda m: m.weight.device.type == "cpu").items():
        plan = saved.get(_shape_key(key))
        if plan is None:
            continue
        adopted = RowPlan(tuple(int(r) for r in plan[0]), tuple(bool(w) for w in plan[1]))
        own, times = modules[0].row_plan, modules[0].row_times
        if own is not None and times is not None:  # keep this start's way where the saved one is clearly slower
            rows, major = [0], [False]
            for m in range(1, len(own.rows)):
                mine = (own.rows[m], own.weight_major[m])
                way = (adopted.rows[m], adopted.weight_major[m]) if m < len(adopted.rows) else mine
                if times.get(way, math.inf) > (1 + ADOPT_TOLERANCE) * times[mine]:
                    way = mine
                rows.append(way[0])
                major.append(way[1])
            adopted = RowPlan(tuple(rows), tuple(major))
        for m in modules:
            m.row_plan = adopted

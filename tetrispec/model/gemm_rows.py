"""Short matmuls run at the row count the CPU BLAS is fastest at.

On MKL float32 (the dev VM: AVX-512, 2 cores), a matmul against a large weight costs more with
7-15 rows than with 16: the default target's LM head (49152 x 576) takes 12 ms for 8 rows and
20 ms for 15, but 9 ms for 16, and its gate/up projection shows the same dip; small weights and
bfloat16 (AMX) do not. Decode and verify steps at 2-8 concurrent requests land exactly there, and
a ragged verify of 13 tokens cost more than a uniform one of 16. Which counts are slow depends on
the BLAS, the CPU and the weight's shape, so it is measured, once per weight shape and dtype when
a model runner starts on CPU (about half a second for the default target), not assumed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # row counts above this run as they are
MIN_SAVING = 0.3  # pad only when it saves at least this fraction (a marginal plan lost a few % in whole forwards)


class Linear(nn.Linear):
    """nn.Linear that runs a short batch padded to the row count its plan says is fastest."""

    row_plan: tuple[int, ...] | None = None  # row_plan[m]: rows to run m rows at (m < len(row_plan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.row_plan
        if plan is not None and x.dim() == 2 and x.shape[0] < len(plan) and not torch.is_grad_enabled():
            m, rows = x.shape[0], plan[x.shape[0]]
            if rows != m:
                padded = x.new_zeros(rows, x.shape[1])
                padded[:m] = x
                return F.linear(padded, self.weight, self.bias)[:m]
        return F.linear(x, self.weight, self.bias)


def measure_plan(weight: torch.Tensor, repeats: int = 2) -> tuple[int, ...]:
    """plan[m] for m = 0..MAX_ROWS: the cheapest row count >= m, where it beats m by MIN_SAVING."""
    x = torch.randn(MAX_ROWS, weight.shape[1], dtype=weight.dtype, device=weight.device)
    times = [float("inf")] * (MAX_ROWS + 1)
    with torch.inference_mode():
        F.linear(x, weight)  # warm-up
        start = time.perf_counter()
        F.linear(x, weight)
        calls = min(max(int(1e-3 / (time.perf_counter() - start + 1e-9)), 1), 64)  # >= ~1 ms per timing
        for _ in range(repeats):  # interleaved passes: a slow moment hits every count alike
            for m in range(1, MAX_ROWS + 1):
                start = time.perf_counter()
                for _ in range(calls):
                    F.linear(x[:m], weight)
                times[m] = min(times[m], time.perf_counter() - start)
    plan = [0]
    for m in range(1, MAX_ROWS + 1):
        best = min(range(m, MAX_ROWS + 1), key=times.__getitem__)
        plan.append(best if times[best] < (1 - MIN_SAVING) * times[m] else m)
    return tuple(plan)


def plan_row_padding(model: nn.Module) -> dict[tuple, tuple[int, ...]]:
    """Give every Linear of a CPU model its plan, measuring each distinct weight shape and dtype once
    (a model shared by several runners keeps the plan it got first)."""
    plans: dict[tuple, tuple[int, ...]] = {}
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type == "cpu" and module.row_plan is None:
            key = (tuple(module.weight.shape), module.weight.dtype)
            if key not in plans:
                plans[key] = measure_plan(module.weight.detach())
            module.row_plan = plans[key]
    return plans

"""Short matmuls padded to a faster row count give the same rows."""

from __future__ import annotations

import torch

from tetrispec.model.gemm_rows import MAX_ROWS, Linear, measure_plan, plan_row_padding


def test_padded_rows_give_the_same_result():
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=True)
    lin.row_plan = tuple([0] + [MAX_ROWS] * MAX_ROWS)  # pad every short batch to MAX_ROWS rows
    for m in (1, 5, 15, MAX_ROWS, 40):
        x = torch.randn(m, 24)
        with torch.inference_mode():
            out = lin(x)
        assert out.shape == (m, 40)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_training_is_never_padded():
    lin = Linear(8, 8)
    lin.row_plan = tuple([0] + [MAX_ROWS] * MAX_ROWS)
    out = lin(torch.randn(3, 8))
    out.sum().backward()  # autograd sees the plain matmul
    assert out.shape == (3, 8) and lin.weight.grad is not None


def test_plans_pad_only_upward_and_are_shared_per_shape():
    plan = measure_plan([torch.randn(64, 32), torch.randn(64, 32)])
    assert len(plan) == MAX_ROWS + 1 and all(m <= p <= MAX_ROWS for m, p in enumerate(plan))
    model = torch.nn.Sequential(Linear(32, 64), Linear(32, 64), Linear(64, 32))
    plans = plan_row_padding(model)
    assert len(plans) == 2 and model[0].row_plan is model[1].row_plan

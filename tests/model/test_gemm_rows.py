"""Short matmuls padded to a faster row count, or run weight-major, give the same rows."""

from __future__ import annotations

import pytest
import torch

from tetrispec.model.gemm_rows import (
    MAX_ROWS,
    Linear,
    RowPlan,
    adopt_plans,
    heaviest_plan,
    measure_plan,
    plan_row_padding,
    saved_plans,
)


@pytest.mark.parametrize("weight_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_padded_and_reordered_rows_give_the_same_result(weight_major: bool, bias: bool):
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=bias)
    # pad every short batch to MAX_ROWS rows, in the given operand order
    lin.row_plan = RowPlan(tuple([0] + [MAX_ROWS] * MAX_ROWS), tuple([False] + [weight_major] * MAX_ROWS))
    for m in (1, 5, 15, MAX_ROWS, 40):
        x = torch.randn(m, 24)
        with torch.inference_mode():
            out = lin(x)
        assert out.shape == (m, 40) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_weight_major_without_padding_gives_the_same_result():
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=False)
    lin.row_plan = RowPlan(tuple(range(MAX_ROWS + 1)), (False,) + (True,) * MAX_ROWS)
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), x @ lin.weight.t(), rtol=1e-5, atol=1e-5)


def test_training_is_never_padded():
    lin = Linear(8, 8)
    lin.row_plan = RowPlan(tuple([0] + [MAX_ROWS] * MAX_ROWS), (False,) + (True,) * MAX_ROWS)
    out = lin(torch.randn(3, 8))
    out.sum().backward()  # autograd sees the plain matmul
    assert out.shape == (3, 8) and lin.weight.grad is not None


def test_plans_pad_only_upward_and_are_shared_per_shape():
    plan = measure_plan([torch.randn(64, 32), torch.randn(64, 32)])
    assert len(plan.rows) == len(plan.weight_major) == MAX_ROWS + 1
    assert all(m <= p <= MAX_ROWS for m, p in enumerate(plan.rows))
    model = torch.nn.Sequential(Linear(32, 64), Linear(32, 64), Linear(64, 32))
    plans = plan_row_padding(model)
    assert len(plans) == 2 and model[0].row_plan is model[1].row_plan
    assert heaviest_plan(model) == plans[((64, 32), torch.float32)].rows  # two of the three weights


def test_an_unplanned_model_has_no_heaviest_plan():
    assert heaviest_plan(torch.nn.Sequential(Linear(4, 4))) is None


def test_saved_plans_are_adopted_by_a_model_of_the_same_shapes():
    source = torch.nn.Sequential(Linear(32, 64), Linear(64, 32))
    plan_row_padding(source)
    source[0].row_plan = RowPlan(tuple([0] + [16] * MAX_ROWS), tuple([False] + [True] * MAX_ROWS))
    saved = saved_plans(source)
    assert set(saved) == {"64x32:float32", "32x64:float32"}
    other = torch.nn.Sequential(Linear(32, 64), Linear(64, 32), Linear(8, 8))
    adopt_plans(other, saved)
    assert other[0].row_plan == source[0].row_plan and other[1].row_plan == source[1].row_plan
    assert other[2].row_plan is None  # a shape the saved plans do not name keeps what it had

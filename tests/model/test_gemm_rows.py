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
    plan_from_times,
    plan_row_padding,
    saved_plans,
    time_ways,
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
    plan = plan_from_times(time_ways([torch.randn(64, 32), torch.randn(64, 32)]))
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


def test_a_saved_way_clearly_slower_on_this_cpu_is_not_adopted():
    """Plans are the CPU's: a profile from another machine must not impose a way that is slow here, while
    a way within ADOPT_TOLERANCE of this start's own (a coin toss between starts) is taken."""
    model = torch.nn.Sequential(Linear(32, 64))
    own = RowPlan(tuple(range(MAX_ROWS + 1)), (False,) * (MAX_ROWS + 1))
    times = {(m, major): 1.0 + m / 100 for m in range(1, MAX_ROWS + 1) for major in (False, True)}
    times[(2, True)] = 3.0  # 2 rows weight-major: three times as slow as x @ W^T here
    times[(4, True)] = 1.04 * times[(3, False)]  # 3 rows padded to 4 weight-major: within the tolerance
    model[0].row_plan, model[0].row_times = own, times
    saved_rows = [0, 2, 2, 4] + list(range(4, MAX_ROWS + 1))
    saved_major = [False, True, True, True] + [False] * (MAX_ROWS - 3)
    adopt_plans(model, {"64x32:float32": [saved_rows, saved_major]})
    plan = model[0].row_plan
    assert (plan.rows[1], plan.weight_major[1]) == (1, False)  # 2 weight-major: 3.0 against 1.01
    assert (plan.rows[2], plan.weight_major[2]) == (2, False)
    assert (plan.rows[3], plan.weight_major[3]) == (4, True)  # 4% dearer by these timings: taken
    assert plan.rows[4:] == tuple(range(4, MAX_ROWS + 1))


def test_plan_from_times_pads_only_where_it_saves_enough():
    times = {(m, major): 1.0 for m in range(1, MAX_ROWS + 1) for major in (False, True)}
    times[(16, True)] = 0.5  # 16 rows weight-major: half the time of anything else
    times[(8, False)] = 0.52
    plan = plan_from_times(times)
    assert plan.rows[1:8] == (16,) * 7 and all(plan.weight_major[1:8])
    assert (plan.rows[8], plan.weight_major[8]) == (8, False)  # 0.52 vs 0.5: not worth padding
    assert plan.rows[16] == 16 and plan.weight_major[16]

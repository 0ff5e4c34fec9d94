"""The piecewise-linear step-time model recovers flat-then-linear costs from noisy timings."""

from __future__ import annotations

import pytest
import torch

from tetrispec.spec.cost_model import CostModel, PiecewiseLinear, StepRecord, fit_piecewise


def truth(n: float, ctx: float) -> float:
    """Memory-bound up to 8 tokens (flat), then compute-bound (linear), plus attention."""
    return 0.05 + 0.004 * max(0.0, n - 8) + 2e-6 * n * ctx


def test_fit_recovers_a_memory_bound_then_linear_curve():
    g = torch.Generator().manual_seed(0)
    xs, cs, ys = [], [], []
    for n in (1, 2, 4, 8, 16, 32, 64):
        for ctx in (64, 256, 768):
            xs.append(n)
            cs.append(ctx)
            ys.append(truth(n, ctx) * (1 + 0.01 * float(torch.randn(1, generator=g))))
    model = fit_piecewise(xs, cs, ys)
    for n in (1, 3, 8, 12, 48, 64, 96):
        for ctx in (100, 500):
            assert abs(model(n, ctx) - truth(n, ctx)) / truth(n, ctx) < 0.05, (n, ctx)
    # the first extra tokens are nearly free, unlike under a straight line through all points
    assert model(4, 300) - model(1, 300) < 0.1 * (model(64, 300) - model(32, 300))


def test_fit_is_monotone_and_never_negative_under_noise():
    xs = [1, 2, 4, 8] * 2
    cs = [100] * 4 + [400] * 4
    ys = [0.05, 0.049, 0.051, 0.048, 0.05, 0.049, 0.047, 0.052]  # noise, decreasing pieces
    model = fit_piecewise(xs, cs, ys)
    assert all(b >= a for a, b in zip(model.values, model.values[1:]))
    assert model.slope_ctx >= 0


def test_vectorized_evaluation_and_round_trip(tmp_path):
    model = CostModel(PiecewiseLinear([1.0, 4.0, 16.0], [0.01, 0.012, 0.04], 1e-6),
                      PiecewiseLinear([1.0, 32.0], [0.001, 0.004], 0.0))
    n = torch.tensor([1.0, 2.5, 4.0, 10.0, 32.0])
    batch = model.target_time(n, 100.0)
    assert batch.tolist() == [model.target_time(float(v), 100.0) for v in n]
    assert model.target_time(2.5, 0.0) == 0.011  # interpolated between knots
    assert model.target_time(32.0, 0.0) > 0.04  # extrapolated along the last segment
    path = tmp_path / "cost.json"
    model.save(path)
    assert CostModel.load(path) == model
    path.write_text('{"target_coef": [1, 2, 3], "draft_coef": [1, 2, 3]}')  # an older format
    assert CostModel.load(path) is None


def test_replay_sums_predicted_step_times():
    model = CostModel.linear(0.01, 0.001, draft_fixed=0.002)
    # a plain step, then 6 drafts verified after depth 3; the measured seconds play no part
    trace = [StepRecord(4, 4, 0, 100.0, 9.0), StepRecord(4, 10, 3, 100.0, 9.0)]
    assert model.replay(trace) == pytest.approx((0.01 + 0.004) + (0.01 + 0.010) + 3 * 0.002)

"""The step-time model recovers memory-bound-then-linear costs, per batch size, from noisy timings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tetrispec.spec import cost_model
from tetrispec.spec.cost_model import (
    CostModel,
    PiecewiseLinear,
    StepRecord,
    VerifyGrid,
    _time_forward,
    fit_grid,
    fit_piecewise,
)


def truth(b: float, q: float, ctx: float) -> float:
    """b sequences with q query tokens each: a per-sequence cost (its cache read and bookkeeping),
    memory-bound matmuls up to 8 tokens in all (flat), then compute-bound (linear), plus scores."""
    n = b * q
    return 0.05 + 0.003 * b + 0.004 * max(0.0, n - 8) + 3e-6 * b * ctx + 1e-6 * n * ctx


def noisy_grid(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs, qs, cs, ys = [], [], [], []
    for b in (1, 2, 4, 8, 16, 32):
        for q in (1, 2, 3, 5):
            for ctx in (64, 256, 768):
                bs.append(b)
                qs.append(q)
                cs.append(ctx)
                ys.append(truth(b, q, ctx) * (1 + 0.01 * float(torch.randn(1, generator=g))))
    return bs, qs, cs, ys


def test_grid_recovers_per_sequence_and_per_token_costs():
    grid = fit_grid(*noisy_grid())
    for b in (1, 3, 8, 20, 32):
        for n_per_seq in (1.0, 1.5, 2.0, 4.0, 5.0):
            for ctx in (100, 500):
                n = b * n_per_seq
                assert abs(grid(b, n, ctx) - truth(b, n_per_seq, ctx)) / truth(b, n_per_seq, ctx) < 0.05
    # The same 40 tokens: 8 sequences x 5 cost much less than 32 x 1 plus 8 drafts, and the model
    # knows that the 8 extra drafts at batch 32 are not free (a model in tokens alone pools them).
    assert grid(8, 40, 300) < grid(32, 40, 300)
    extra = grid(32, 40, 300) - grid(32, 32, 300)
    assert extra == pytest.approx(truth(32, 40 / 32, 300) - truth(32, 1, 300), rel=0.2)


def test_grid_is_monotone_and_slopes_never_negative_under_noise():
    g = torch.Generator().manual_seed(1)
    bs, qs, cs, ys = [], [], [], []
    for b in (1, 2, 4):
        for q in (1, 2, 3):
            for ctx in (100, 400):
                bs.append(b)
                qs.append(q)
                cs.append(ctx)
                ys.append(0.05 + 0.002 * float(torch.randn(1, generator=g)))  # pure noise: flat, not decreasing
    grid = fit_grid(bs, qs, cs, ys)
    v = torch.tensor(grid.values)
    assert (v[:, 1:] >= v[:, :-1]).all() and (v[1:] >= v[:-1]).all()
    assert grid.slope_seq_ctx >= 0 and grid.slope_token_ctx >= 0


def test_draft_fit_is_monotone_and_never_negative_under_noise():
    xs = [1, 2, 4, 8] * 2
    cs = [100] * 4 + [400] * 4
    ys = [0.05, 0.049, 0.051, 0.048, 0.05, 0.049, 0.047, 0.052]  # noise, decreasing pieces
    model = fit_piecewise(xs, cs, ys)
    assert all(b >= a for a, b in zip(model.values, model.values[1:]))
    assert model.slope_ctx >= 0


def test_vectorized_evaluation_and_round_trip(tmp_path):
    grid = VerifyGrid([1.0, 4.0, 16.0], [1.0, 2.0], [[0.01, 0.012], [0.012, 0.02], [0.04, 0.06]], 1e-6, 2e-7)
    model = CostModel(grid, PiecewiseLinear([1.0, 32.0], [0.001, 0.004], 0.0), draft_prefill=5e-5)
    n = torch.tensor([4.0, 6.0, 8.0, 10.0, 32.0])
    batch = model.target_time(4, n, 100.0)
    assert batch.tolist() == pytest.approx([model.target_time(4, float(v), 100.0) for v in n], rel=1e-12)
    assert model.target_time(4, 6.0, 0.0) == pytest.approx(0.016)  # halfway between 1 and 2 tokens per sequence
    assert model.target_time(10, 10.0, 0.0) == pytest.approx(0.026)  # halfway between batch knots 4 and 16
    assert model.target_time(16, 64.0, 0.0) > 0.06  # extrapolated along the last segment
    assert model.draft_time(16.5, 0.0) == pytest.approx(0.0025)
    path = tmp_path / "cost.json"
    model.save(path)
    assert CostModel.load(path) == model
    path.write_text('{"format": 3, "target": {}, "draft": {}}')  # an older format
    assert CostModel.load(path) is None


def test_the_first_token_past_each_knot_follows_its_own_knot(tmp_path):
    """At batch 8, 9 tokens cost 62 ms where 8 cost 55 and 16 cost 68 (the dev VM), and 17 cost about
    what 24 do: a knot one token past each query-length knot holds those steps, which a line between
    the knots put at an eighth of their height."""
    rows = [[0.037, 0.047, 0.050], [0.047, 0.050, 0.055], [0.055, 0.068, 0.075]]
    plain = VerifyGrid([1.0, 2.0, 8.0], [1.0, 2.0, 3.0], rows, 0.0, 0.0)
    grid = VerifyGrid([1.0, 2.0, 8.0], [1.0, 2.0, 3.0], rows, 0.0, 0.0,
                      plus_one=[[0.047, 0.050], [0.049, 0.052], [0.062, 0.074]])
    assert plain(8, 9.0, 0.0) == pytest.approx(0.055 + 0.013 / 8)
    assert grid(8, 9.0, 0.0) == pytest.approx(0.062)
    assert grid(8, 12.0, 0.0) == pytest.approx(0.062 + 0.006 * 3 / 7)  # a line from 9 tokens to 16
    assert grid(8, 17.0, 0.0) == pytest.approx(0.074)  # the second level's first token
    assert grid(8, 20.0, 0.0) == pytest.approx(0.074 + 0.001 * 3 / 7)  # a line from 17 tokens to 24
    for n in (8.0, 16.0, 24.0):  # the knots of the grid itself are unchanged
        assert grid(8, n, 0.0) == pytest.approx(plain(8, n, 0.0))
    assert grid(1, 2.0, 0.0) == pytest.approx(0.047)  # at batch 1, B * q + 1 is the next knot
    assert grid(2, 3.0, 0.0) == pytest.approx(0.049)
    assert grid(2, 5.0, 0.0) == pytest.approx(0.052)
    assert grid(5, 6.0, 0.0) == pytest.approx(0.049 + (0.062 - 0.049) * 0.5)  # interpolated between batch knots
    clamped = VerifyGrid([8.0], [1.0, 2.0], [[0.055, 0.068]], 0.0, 0.0, plus_one=[[0.070]])
    assert clamped(8, 9.0, 0.0) == pytest.approx(0.068)  # never above the next knot
    model = CostModel(grid, PiecewiseLinear([1.0], [0.001], 0.0))
    model.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == model


def test_linear_model_is_linear_in_tokens_at_every_batch():
    model = CostModel.linear(0.01, 0.001, per_token_ctx=1e-6)
    for b in (1, 3, 32):
        for n in (b, 2 * b, 3.5 * b):
            assert model.target_time(b, n, 100.0) == pytest.approx(0.01 + 0.001 * n + 1e-6 * n * 100)


def test_replay_sums_predicted_step_times():
    model = CostModel.linear(0.01, 0.001, draft_fixed=0.002)
    # a plain step, then 6 drafts verified after depth 3; the measured seconds play no part
    trace = [StepRecord(4, 4, 0, 100.0, 9.0), StepRecord(4, 10, 3, 100.0, 9.0)]
    assert model.replay(trace) == pytest.approx((0.01 + 0.004) + (0.01 + 0.010) + 3 * 0.002)
    # the draft reading 300 unseen tokens (a prompt) is priced per token, as profiled
    priced = CostModel.linear(0.01, 0.001, draft_fixed=0.002, draft_prefill=1e-5)
    caught_up = [StepRecord(4, 10, 3, 100.0, 9.0, 1.0, 0.5, 300)]
    assert priced.replay(caught_up) == pytest.approx((0.01 + 0.010) + 3 * 0.002 + 300 * 1e-5)


def test_timed_forwards_each_follow_the_untimed_setup():
    """The draft is profiled right after a target forward, as in a real step (cold CPU caches)."""
    calls = []

    class Runner:
        block_size, device = 16, torch.device("cpu")

        def forward(self, items, logits_for):
            calls.append(("forward", len(items), len(items[0].tokens), items[0].start))

    _time_forward(Runner(), 3, 40, 2, repeats=4, before=lambda: calls.append("before"))
    assert calls == [("forward", 3, 2, 40)] + ["before", ("forward", 3, 2, 40)] * 4  # the first is an untimed warm-up


def test_a_slow_spell_during_one_pass_over_the_grid_does_not_bend_the_profile(monkeypatch):
    """Each shape keeps the median of its passes: the second of three passes runs 1.5x slow at
    batch 4 and up (the host busy for a while), and the profile still prices those batches right.
    Profiled in a single pass that is slow there, it would not (the contrast shows the spell matters)."""
    target, draft = (SimpleNamespace(block_size=16, device=torch.device("cpu"), model=torch.nn.Module(),
                                     forward=lambda items, logits_for: None) for _ in range(2))
    passes, spell = [], {}

    def timed(runner, batch, ctx, q_len, repeats, logits_for="all", before=None, extra=0):
        if runner is target and (batch, ctx, q_len, extra) == (1, 64, 1, 0):  # the first shape of each pass
            passes.append(1)
        slow = 1.5 if len(passes) == spell["pass"] and batch >= 4 else 1.0
        if runner is draft:
            return slow * (0.002 + 0.0005 * batch) * (q_len if q_len > 1 else 1)
        return slow * truth(batch, q_len + extra / batch, ctx)

    monkeypatch.setattr(cost_model, "_time_forward", timed)
    for rounds, slow_pass, close in ((3, 2, True), (1, 1, False)):
        passes.clear()
        spell["pass"] = slow_pass
        cost = cost_model.profile(target, draft, max_batch=8, max_k=4, num_slots=100_000, rounds=rounds,
                                  progress=False)
        assert len(passes) == rounds
        errors = [abs(cost.target_time(b, b * q, ctx) / truth(b, q, ctx) - 1)
                  for b in (4, 8) for q in (1, 2, 3, 5) for ctx in (64, 256, 768)]
        assert (max(errors) < 0.02) == close, (rounds, max(errors))


def test_a_profile_from_another_host_is_not_current(tmp_path, caplog):
    """Step times and row plans belong to the machine they were timed on: a profile that names another
    host is re-made (load_or_profile, `tetrispec profile`), one that names none is taken as it is."""
    cpu = torch.device("cpu")
    here = cost_model.host_fingerprint(cpu)
    assert here.startswith("cpu ") and f"torch {torch.__version__}" in here
    grid = VerifyGrid([1.0, 2.0], [1.0, 2.0], [[0.01, 0.012], [0.012, 0.02]], 0.0, 0.0)
    path = tmp_path / "cost.json"
    for host, current in ((here, True), ("", True), ("cpu Some Other CPU; 64 cores", False)):
        model = CostModel(grid, PiecewiseLinear([1.0], [0.001], 0.0), host=host)
        model.save(path)
        assert (CostModel.load_current(path, cpu) == model) is current
    assert "made on another host" in caplog.text
    assert CostModel.load_current(tmp_path / "missing.json", cpu) is None

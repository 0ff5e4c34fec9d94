"""Goodput-chosen capacity and the online acceptance estimator (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tetrispec.spec.auto_capacity import (
    EXPLORE_AFTER,
    EXPLORE_MARGIN,
    LEVEL_ROWS,
    LEVEL_WEIGHT,
    PROBE_BUDGET,
    PROBE_ROWS,
    REEXPLORE_AFTER,
    REEXPLORE_BUDGET,
    REUSE_MAX,
    REUSE_STEPS,
    SETTLED,
    SHAPE_DRIFT,
    SHAPE_PRIOR,
    SHAPE_SETTLED,
    SPIKE,
    SPIKE_SETTLED,
    SWITCH_MARGIN,
    AcceptanceEstimator,
    AutoTetris,
    StepClock,
    _best_capacity,
    best_capacity,
    reliability_table,
    reuse_steps,
    verify_bucket,
)
from tetrispec.spec.cost_model import CostModel, PiecewiseLinear, StepRecord, VerifyGrid, isotonic
from tetrispec.spec.proposer import INLINE_CATCH_UP
from tetrispec.spec.selectors import BatchInfo


def cost(per_token: float, fixed: float = 0.05, draft: float = 0.001) -> CostModel:
    return CostModel.linear(fixed, per_token, draft_fixed=draft)


def test_capacity_zero_when_verification_is_too_expensive():
    values = torch.full((8, 4), 0.3)
    c, rate = best_capacity(values, 8, 0.0, cost(per_token=1.0), 100)
    assert c == 0 and rate == pytest.approx(8 / (0.05 + 8.0))


def test_capacity_everything_when_verification_is_free():
    values = torch.rand(8, 4) * 0.5 + 0.01
    c, _ = best_capacity(values, 8, 0.0, cost(per_token=0.0), 100)
    assert c == 32


def test_capacity_matches_brute_force_in_between():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        values = torch.rand(6, 3, generator=g)
        cm = cost(per_token=float(torch.rand(1, generator=g)) * 0.02, fixed=0.05)
        c, rate = best_capacity(values, 6, 0.01, cm, 50)
        v = values.flatten().sort(descending=True).values
        rates = [(6 + float(v[:k].sum())) / (0.01 + cm.target_time(6, 6 + k, 50)) for k in range(19)]
        assert rate == pytest.approx(max(rates))
        assert rates[c] == pytest.approx(max(rates))


def test_isotonic_is_monotone_and_weighted():
    assert isotonic([0.1, 0.5, 0.3, 0.9], [1, 1, 1, 1]) == pytest.approx([0.1, 0.4, 0.4, 0.9])
    assert isotonic([0.5, 0.2], [3, 1]) == pytest.approx([0.425, 0.425])


def test_estimator_converges_to_a_known_acceptance_curve_per_position():
    g = torch.Generator().manual_seed(1)
    est = AcceptanceEstimator(num_bins=20, positions=3, warmup=2000)
    # the draft is over-confident at low q, and a token deeper in an accepted prefix is easier
    truth = lambda q, pos: (0.1 + 0.8 * q**2 + 0.05 * pos).clamp(max=1.0)  # noqa: E731
    for _ in range(120):
        q = torch.rand(500, generator=g)
        pos = torch.randint(0, 4, (500,), generator=g)  # positions 2 and 3 share the last table
        est.update(q, pos, (torch.rand(500, generator=g) < truth(q, pos.clamp(max=2))).float())
    grid = torch.linspace(0.025, 0.975, 20)
    for pos in range(3):
        assert np.abs(est.estimate(grid, pos) - truth(grid, pos).numpy()).max() < 0.06
    assert (est.estimate(grid, 1) - est.estimate(grid, 0)).mean() > 0.03  # the position effect is learned
    assert np.array_equal(est.estimate(grid, 7), est.estimate(grid, 2))
    rel = est.reliability()
    assert rel["ece"] is not None and rel["ece"] < 0.03
    assert len(rel["table"]) <= 10
    assert sum(r["count"] for r in rel["table"]) == 120 * 500 - 2000
    assert rel["ece_floor"] < 0.01  # 58,000 outcomes: chance alone explains little of an ECE


def test_ece_floor_is_what_a_calibrated_estimator_shows_by_chance():
    g = np.random.default_rng(3)
    eces, floors = [], []
    for n in (100, 300, 2000):
        for _ in range(300):
            p = g.random(n)  # perfectly calibrated: each outcome is drawn with its estimate's probability
            hits = (g.random(n) < p).astype(float)
            b = np.minimum((p * 10).astype(int), 9)
            out = reliability_table(np.bincount(b, minlength=10), np.bincount(b, p, 10), np.bincount(b, hits, 10))
            eces.append(out["ece"])
            floors.append(out["ece_floor"])
        assert np.mean(eces[-300:]) == pytest.approx(np.mean(floors[-300:]), rel=0.15)
    assert np.mean(floors[:300]) > 0.05 > np.mean(floors[-300:])  # 100 outcomes: 0.05 is within chance


def test_estimate_drafts_reads_columns_as_positions():
    est = AcceptanceEstimator(positions=2)
    est.update(torch.full((400,), 0.55), torch.zeros(400, dtype=torch.long), torch.zeros(400))
    est.update(torch.full((400,), 0.55), torch.ones(400, dtype=torch.long), torch.ones(400))
    out = est.estimate_drafts([[0.55] * 3] * 2)
    assert out[0] == out[1] and out[0][0] < 0.2 and min(out[0][1:]) > 0.8
    assert out[0] == pytest.approx(est.estimate([0.55] * 3, [0, 1, 2]).tolist())  # the same table as estimate


def test_estimator_starts_from_the_draft_probability_and_persists(tmp_path):
    est = AcceptanceEstimator()
    q = torch.tensor([0.125, 0.525, 0.925])
    assert est.estimate(q, 0).tolist() == pytest.approx(q.tolist(), abs=0.03)
    est.update(torch.full((100,), 0.9), torch.zeros(100, dtype=torch.long), torch.zeros(100))
    assert est.estimate(torch.tensor([0.9]), 0).item() < 0.4  # pooled with the bins around it: stays monotone
    assert (np.diff(est.table, axis=1) >= 0).all()
    other = AcceptanceEstimator()
    other.load_state(est.state())
    assert np.array_equal(other.table, est.table)
    old_format = {"num_bins": 20, "trials": [0.0] * 20, "accepts": [0.0] * 20}  # before positions: ignored
    fresh = AcceptanceEstimator()
    fresh.load_state(old_format)
    assert fresh.seen == 0


def test_auto_tetris_selects_prefixes_within_capacity():
    sel = AutoTetris(max_depth=4, cost=cost(per_token=0.002, fixed=0.02))
    logprobs = torch.log(torch.tensor([[0.95, 0.9, 0.9, 0.8], [0.2, 0.9, 0.9, 0.9], [0.6, 0.6, 0.1, 0.1]]))
    lengths = sel.select(logprobs, BatchInfo(3, 100))
    assert lengths[0] >= lengths[2] >= lengths[1]
    assert int(lengths.sum()) == sel.last_capacity
    # expensive verification: nothing is worth verifying, and drafting is skipped
    pricey = AutoTetris(max_depth=4, cost=cost(per_token=10.0))
    assert int(pricey.select(logprobs, BatchInfo(3, 100)).sum()) == 0
    assert pricey.depth(BatchInfo(3, 100)) == 0
    # free verification: draft to full depth and keep going while drafts are confident
    free = AutoTetris(max_depth=4, cost=cost(per_token=0.0, draft=1e-6))
    assert free.depth(BatchInfo(3, 100)) == 4
    assert free.keep_going(BatchInfo(3, 100))(logprobs[:, :2]) == [True] * 3


def test_auto_tetris_learns_from_outcomes():
    sel = AutoTetris(max_depth=2, cost=cost(per_token=0.01))
    logprobs = torch.log(torch.full((4, 2), 0.9))
    assert int(sel.select(logprobs, BatchInfo(4, 10)).sum()) == 8  # before: the draft's own belief pays
    for _ in range(50):  # drafts at q = 0.9 are always rejected
        sel.observe(logprobs, [2, 2, 2, 2], [0, 0, 0, 0])
    sel.learn()  # outcomes are learned from a few steps at a time
    assert sel.estimator.estimate(torch.tensor([0.9]), 0).item() < 0.3
    assert int(sel.select(logprobs, BatchInfo(4, 10)).sum()) == 0


def test_probes_back_off_while_drafting_does_not_pay():
    sel = AutoTetris(max_depth=3, cost=cost(per_token=10.0), probe_every=4)
    batch = BatchInfo(8, 100)
    drafted_at = [step for step in range(200) if sel.depth(batch)]
    gaps = [b - a for a, b in zip(drafted_at, drafted_at[1:])]
    assert gaps[:5] == [9, 17, 33, 65, 65]  # wait 4, 8, 16, 32, then capped at 16 x 4 = 64 plain steps
    sel.cost = cost(per_token=0.0)  # verification becomes free: drafting resumes at once, back-off reset
    assert sel.depth(batch) == 3 and sel.probe_interval == 4


def test_auto_tetris_persists_calibration_and_depth_means(tmp_path):
    path = tmp_path / "profile.calibration.json"
    sel = AutoTetris(max_depth=3, cost=cost(per_token=0.01))
    sel.persist_to(path)
    logprobs = torch.log(torch.full((50, 3), 0.3))
    for _ in range(50):  # 2,500 outcomes (one per row: the first draft is rejected): learned, written to disk
        sel.select(logprobs, BatchInfo(50, 10))
        sel.observe(logprobs, [3] * 50, [0] * 50)
    assert path.exists()
    again = AutoTetris(max_depth=4, cost=cost(per_token=0.01))
    again.persist_to(path)
    assert again.estimator.estimate(torch.tensor([0.28]), 0).item() < 0.01  # learned (saved at 1,000 outcomes)
    assert AcceptanceEstimator().estimate(torch.tensor([0.28]), 0) > 0.25
    assert again.level_means[:3] == pytest.approx(sel.level_means, abs=0.05) and again.level_means[0] < 0.1
    assert again.level_means[3] <= again.level_means[2]  # deeper than saved: capped by the level above


def test_measured_step_times_reprice_speculation():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    batch = BatchInfo(8, 100)
    assert sel.depth(batch) == 2  # by the profile, drafting pays
    plain_t, verify_t = model.target_time(8, 8, 100.0), model.target_time(8, 16, 100.0)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(100):  # plain steps run as profiled; drafting and verification twice as slow
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 2 * (verify_t + draft_t), 2 * draft_t))
    assert sel.clock(8).ratio == pytest.approx({"plain": 1.0, "draft": 2.0, "verify": 2.0}, rel=0.02)
    assert sel.depth(batch) == 0
    for _ in range(100):  # the whole machine slows down alike: speculation pays again
        sel.observe_step(StepRecord(8, 8, 0, 100.0, 1.5 * plain_t))
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 1.5 * (verify_t + draft_t), 1.5 * draft_t))
    assert sel.clock(8).ratio == pytest.approx({"plain": 1.5, "draft": 1.5, "verify": 1.5}, rel=0.02)
    assert sel.depth(batch) == 2
    for _ in range(200):  # a slow draft alone makes deep drafting stop sooner
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 1.5 * verify_t + 40 * draft_t, 40 * draft_t))
    fresh = AutoTetris(max_depth=2, cost=model)
    verdicts = [(all(fresh.keep_going(batch)(torch.log(torch.full((8, 1), q)))), all(sel.keep_going(batch)(torch.log(
        torch.full((8, 1), q))))) for q in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    assert all(profiled or not slow for profiled, slow in verdicts)
    assert any(profiled and not slow for profiled, slow in verdicts)


def test_stale_speculation_prices_drift_back_while_drafting_is_paused():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)  # no probes: only the drift can restart drafting
    batch = BatchInfo(8, 100)
    plain_t, verify_t = model.target_time(8, 8, 100.0), model.target_time(8, 16, 100.0)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(20):  # plain steps as profiled
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
    for _ in range(100):  # then speculative steps timed during a slow spell
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 3 * (verify_t + draft_t), 3 * draft_t))
    assert sel.depth(batch) == 0
    for _ in range(16):  # a short pause keeps what was measured
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
    assert sel.clock(8).ratio["verify"] == pytest.approx(3.0, rel=0.05)
    for _ in range(400):  # slowly: a busy host slows verifies (compute-bound) more than plain steps
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
    assert sel.clock(8).ratio["verify"] > 2.0 and sel.depth(batch) == 0
    for _ in range(3000):  # a long pause lets it fade toward the plain steps' ratio (the profile's relative costs)
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
    assert sel.clock(8).ratio["verify"] < 1.1 and sel.depth(batch) == 2


def test_each_batch_size_range_keeps_its_own_step_times():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
    assert sel.clock(16).ratio == {"plain": 1.0, "draft": 1.0, "verify": 1.0}  # nothing timed: the profile
    for B in (8, 16):
        plain_t, verify_t = model.target_time(B, B, 100.0), model.target_time(B, 2 * B, 100.0)
        draft_t = model.draft_time(B, 100.0)
        slow = 3 if B == 8 else 1  # at batch 8 speculation runs three times slower than profiled
        for _ in range(100):
            sel.observe_step(StepRecord(B, B, 0, 100.0, plain_t))
            sel.observe_step(StepRecord(B, 2 * B, 1, 100.0, slow * (verify_t + draft_t), slow * draft_t))
    assert sel.depth(BatchInfo(8, 100)) == 0 and sel.depth(BatchInfo(5, 100)) == 0  # 5..8: one range
    assert sel.depth(BatchInfo(16, 100)) == 2 and sel.depth(BatchInfo(9, 100)) == 2  # 9..16: its own
    # a range not timed yet starts from the nearest one timed (ties: the smaller)
    assert sel.clock(4).ratio == pytest.approx(sel.clock(8).ratio) and sel.depth(BatchInfo(4, 100)) == 0
    assert sel.clock(32).ratio == pytest.approx(sel.clock(16).ratio) and sel.depth(BatchInfo(32, 100)) == 2
    assert sel.clock(32).counts == {}


def test_long_speculative_runs_let_a_stale_plain_price_drift():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    plain_t, verify_t = model.target_time(8, 8, 100.0), model.target_time(8, 16, 100.0)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(100):  # plain steps timed during a slow spell
        sel.observe_step(StepRecord(8, 8, 0, 100.0, 3 * plain_t))
    for _ in range(16):  # a short speculative run keeps it
        sel.observe_step(StepRecord(8, 16, 1, 100.0, verify_t + draft_t, draft_t))
    assert sel.clock(8).ratio["plain"] == pytest.approx(3.0, rel=0.05)
    for _ in range(400):  # slowly: the host's relative costs are not the profile's (near a tie, re-timed)
        sel.observe_step(StepRecord(8, 16, 1, 100.0, verify_t + draft_t, draft_t))
    assert sel.clock(8).ratio["plain"] > 2.0
    for _ in range(3000):
        sel.observe_step(StepRecord(8, 16, 1, 100.0, verify_t + draft_t, draft_t))
    assert sel.clock(8).ratio["plain"] < 1.1


def test_sequences_dear_to_catch_up_on_wait_while_the_others_speculate():
    """Drafting for a sequence first means the draft reading what it has not seen (a prompt entering
    decoding, or a pause in drafting), paid once and spread over the steps the sequence has left:
    a long lag with little output left is not worth it, and only the others are drafted for."""
    model = CostModel.linear(0.05, 0.002, draft_fixed=0.004, draft_prefill=1.5e-4)
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
    assert sel.depth(BatchInfo(8, 100, lags=(1,) * 8, remainings=(40,) * 8)) == 2
    assert sel.draft_rows(BatchInfo(8, 100)) is None  # nothing to catch up on: all of them
    # two 300-token prompts (45 ms of draft reading each) entering with 4 tokens to produce
    entering = BatchInfo(8, 100, lags=(1, 300, 1, 1, 1, 300, 1, 1), remainings=(40, 4, 40, 40, 40, 4, 40, 40))
    assert sel.depth(entering) == 2 and sel.draft_rows(entering) == [0, 2, 3, 4, 6, 7]
    # the same prompts with hundreds of tokens to produce: their reading is spread thin, all are drafted
    assert sel.depth(BatchInfo(8, 100, lags=entering.lags, remainings=(400,) * 8)) == 2
    assert sel.draft_rows(entering) is None
    # every sequence that dear: plain decoding
    assert sel.depth(BatchInfo(8, 100, lags=(300,) * 8, remainings=(4,) * 8)) == 0


def test_resuming_after_a_pause_pays_for_the_lag_spread_over_what_is_left():
    model = CostModel.linear(0.05, 0.002, draft_fixed=0.004, draft_prefill=1e-4)
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
    # 8 sequences that ran 300 tokens without drafting: 0.24 s of catch-up before drafting again
    assert sel.depth(BatchInfo(8, 300, lag_tokens=2400, remaining=400)) == 2  # hundreds of steps left: pays
    assert sel.depth(BatchInfo(8, 300, lag_tokens=2400, remaining=10)) == 0  # a few steps left: it does not
    assert sel.depth(BatchInfo(8, 300, lag_tokens=0, remaining=10)) == 2  # nothing to catch up


def test_probes_wait_until_they_cost_little_next_to_plain_decoding():
    model = CostModel.linear(0.001, 0.01, draft_fixed=0.004, draft_prefill=1e-4)  # drafting never pays
    plain = model.target_time(8, 8, 300)

    def first_probe(lags: tuple[int, ...]) -> tuple[int, list[int] | None]:
        sel = AutoTetris(max_depth=2, cost=model, probe_every=4)
        batch = BatchInfo(8, 300, lag_tokens=sum(lags), lags=lags)
        step = next(step for step in range(1000) if sel.depth(batch))
        return step, sel.draft_rows(batch)

    assert first_probe((0,) * 8) == (4, list(range(PROBE_ROWS)))
    # a probe drafts for the PROBE_ROWS sequences with the least to catch up on, and pays only theirs:
    # PROBE_ROWS x 300 tokens and two draft forwards wait for (their cost / PROBE_BUDGET) of plain steps
    step, rows = first_probe((300, 900, 300, 300, 900, 900, 300, 900))
    assert rows == [0, 2, 3, 6][:PROBE_ROWS]
    cost = model.catch_up_time(300 * PROBE_ROWS) + 2 * model.draft_time(PROBE_ROWS, 300)
    assert step == pytest.approx(cost / PROBE_BUDGET / plain, abs=1)
    # a batch no larger than a probe is drafted whole
    sel = AutoTetris(max_depth=2, cost=model, probe_every=1)
    small = BatchInfo(PROBE_ROWS, 300, lags=(0,) * PROBE_ROWS)
    assert any(sel.depth(small) for _ in range(100)) and sel.draft_rows(small) is None


def test_a_kind_of_step_not_yet_seen_follows_the_measured_one():
    """A range where only plain steps ran so far prices speculation at the profile's relative cost
    on the machine as measured, not at the profile's absolute times."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    plain_t = model.target_time(32, 32, 100.0)
    for _ in range(100):  # the machine runs 30% slower than profiled
        sel.observe_step(StepRecord(32, 32, 0, 100.0, 1.3 * plain_t))
    assert sel.clock(32).ratio == pytest.approx({"plain": 1.3, "draft": 1.3, "verify": 1.3}, rel=0.01)


def test_keep_going_prices_the_next_level_from_how_draft_confidence_moves():
    model = cost(per_token=0.004, fixed=0.05, draft=0.004)
    steady, fading = AutoTetris(max_depth=3, cost=model), AutoTetris(max_depth=3, cost=model)
    for _ in range(200):  # draft-side only: pairs count even when nothing was verified
        steady.observe(torch.log(torch.tensor([[0.9, 0.96]])), [0], [0])
        fading.observe(torch.log(torch.tensor([[0.9, 0.04]])), [0], [0])
    steady.learn(), fading.learn()
    assert steady.estimator.transitions.sum() == 200 and steady.estimator.seen == 0
    batch = BatchInfo(1, 100)
    confident = torch.log(torch.tensor([[0.9]]))
    # a confident draft whose next token tends to be confident too is worth one more forward ...
    assert steady.keep_going(batch)(confident) == [True]
    # ... one whose confidence tends to collapse is not, though the first token alone is worth verifying
    assert fading.keep_going(batch)(confident) == [False]
    assert int(fading.select(confident, batch).sum()) == 1
    # and a hopeless draft stops either way
    assert steady.keep_going(batch)(torch.log(torch.tensor([[0.05]]))) == [False]


def test_step_prices_match_the_cost_model():
    """prices() rebuilds the verify curve from a straight line in the context: it must be the model's."""
    grid = VerifyGrid([1.0, 4.0, 16.0], [1.0, 2.0, 5.0], [[0.03, 0.031, 0.04], [0.035, 0.04, 0.07],
                                                         [0.06, 0.09, 0.2]], 2e-6, 3e-7)
    model = CostModel(grid, PiecewiseLinear([1.0, 16.0], [0.003, 0.008], 1e-7))
    sel = AutoTetris(max_depth=3, cost=model)
    for B, s in [(1, 37.0), (5, 410.5), (16, 1200.0), (5, 90.0)]:
        sel.clock(B).ratio.update(plain=0.8, draft=1.2, verify=0.9)
        price = sel.prices(B, s)
        n = B + np.arange(3 * B + 1)
        assert price.verify == pytest.approx(0.9 * model.target_time(B, n, s))
        assert price.draft(B) == pytest.approx(1.2 * model.draft_time(B, s))


def test_no_speculative_step_is_priced_below_a_plain_step():
    model = cost(per_token=0.01, fixed=0.0, draft=0.001)
    sel = AutoTetris(max_depth=2, cost=model)
    sel.clock(32).ratio.update(plain=1.2, verify=1.1)  # verifies timed a little faster than plain steps
    price = sel.prices(32, 100.0)
    plain = 1.2 * model.target_time(32, 32, 100.0)
    # the plain step's price, plus each extra token's at the verify ratio
    extra = np.diff([model.target_time(32, 32 + c, 100.0) for c in range(65)])
    assert price.verify == pytest.approx(plain + 1.1 * np.concatenate([[0.0], np.cumsum(extra)]))
    # first drafts all in the lowest confidence bin: no draft pays for its verification, and a step
    # that drafts and verifies nothing is no faster than a plain one, so auto decodes plainly
    sel.estimator.firsts[0] = 1e6
    sel.level_means = [0.0, 0.0]
    assert sel.depth(BatchInfo(32, 100)) == 0


def test_the_plain_price_under_a_speculative_step_is_the_plain_steps_own():
    """With row padding (1 token run at 4), the plain step is priced at its own token count, as depth() and
    observe_step price it: the padded count, between the profile's knots, is dearer and must not raise the
    verify prices of a host whose verifies run relatively fast."""
    grid = VerifyGrid([1.0, 2.0], [1.0, 2.0, 5.0], [[0.020, 0.021, 0.030], [0.022, 0.025, 0.040]], 0.0, 0.0)
    model = CostModel(grid, PiecewiseLinear([1.0, 2.0], [0.002, 0.003], 0.0))
    sel = AutoTetris(max_depth=3, cost=model)
    sel.attach_cost_model(model, row_plan=(0, 4, 4, 4, 4))
    sel.clock(1).ratio.update(plain=1.0, verify=0.9)
    price = sel.prices(1, 0.0)
    assert model.target_time(1, 4, 0.0) > model.target_time(1, 1, 0.0)  # 4 tokens interpolated toward 5
    assert price.verify[0] == pytest.approx(0.9 * model.target_time(1, 4, 0.0))  # above the plain 0.020: as is
    sel.clock(1).ratio.update(plain=1.4)  # plain steps relatively slower: the floor holds
    assert sel.prices(1, 0.0).verify[0] == pytest.approx(1.4 * 0.020)


def test_keep_going_stops_the_requests_whose_next_token_cannot_pay():
    """Per request: a hopeless draft stops while confident ones in the same batch go on (and a
    request that already stopped, log-confidence -inf, stays stopped)."""
    sel = AutoTetris(max_depth=3, cost=cost(per_token=0.004, fixed=0.05, draft=0.001))
    batch = BatchInfo(4, 100)
    logprobs = torch.log(torch.tensor([[0.95, 0.9], [0.9, 0.95], [0.02, 0.01], [0.9, 0.0]]))
    assert sel.keep_going(batch)(logprobs) == [True, True, False, False]


def test_typical_first_estimates_are_the_quantiles_of_past_first_drafts():
    est = AcceptanceEstimator()
    for _ in range(100):  # a quarter of first drafts confident, the rest hopeless
        est.count_transitions(np.array([[0.97], [0.03], [0.03], [0.03]]))
    typical = est.typical_first_estimates(8)
    assert typical[:2] == pytest.approx(est.estimate(0.97, 0)) and typical[2:] == pytest.approx(est.estimate(0.03, 0))
    assert list(typical) == sorted(typical, reverse=True)


def test_drafting_pays_when_only_the_confident_part_of_a_level_is_verified():
    """Verifying every first draft costs more than it brings, verifying the confident quarter pays:
    depth() must see the second (select verifies the best C), not only the first."""
    model = cost(per_token=0.004, fixed=0.05, draft=0.001)
    batch = BatchInfo(8, 0.0)
    spread, flat = AutoTetris(max_depth=2, cost=model), AutoTetris(max_depth=2, cost=model)
    for _ in range(100):  # the same mean first estimate (~0.27): spread over rows, or the same everywhere
        spread.estimator.count_transitions(np.array([[0.97]] * 2 + [[0.03]] * 6))
        flat.estimator.count_transitions(np.full((8, 1), 0.27))
    for sel in (spread, flat):
        sel.level_means = [0.27, 0.1]
    all_verified = (8 + 8 * 0.27) / (model.target_time(8, 16, 0.0) + model.draft_time(8, 0.0))
    assert all_verified < 8 / model.target_time(8, 8, 0.0)  # verifying everything drafted loses to plain
    assert spread.depth(batch) == 2 and flat.depth(batch) == 0


def test_verify_prices_follow_the_target_runners_row_padding():
    """A forward of 10 to 15 tokens that runs its matmuls padded to 16 rows is priced as 16."""
    sel = AutoTetris(max_depth=2)
    plan = tuple(range(10)) + (16,) * 7
    sel.attach_cost_model(cost(per_token=0.002), row_plan=plan)
    price = sel.prices(8, 100.0)
    assert price.verify[2:8] == pytest.approx([price.verify[8]] * 6)  # 10..15 tokens: as 16
    assert price.verify[1] < price.verify[8] and price.verify[9] > price.verify[8]
    # so a capacity is not chosen inside the gap: the whole level, or at most 9 tokens in all
    values = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05])
    capacity, _ = _best_capacity(values, 8, 0.0, price.verify)
    assert capacity <= 1 or capacity == 8


def test_a_verify_that_ran_at_its_padded_price_teaches_no_correction():
    """A 13-token verify at batch 8 that took what 16 tokens take is on the profile: compared with the
    unpadded 13 instead, the padding showed up as a slow host and was then charged twice (prices pad)."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    sel.attach_cost_model(model, row_plan=tuple(range(10)) + (16,) * 7)
    verify_t, draft_t = model.target_time(8, 16, 100.0), model.draft_time(8, 100.0)
    for _ in range(9):
        sel.observe_step(StepRecord(8, 13, 1, 100.0, verify_t + draft_t, draft_t))
    assert sel.clock(8).ratio["verify"] == pytest.approx(1.0)
    price = sel.prices(8, 100.0)
    assert price.verify[5] == pytest.approx(verify_t)


def test_a_fresh_range_learns_its_step_times_in_a_few_steps():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    verify_t, draft_t = model.target_time(8, 16, 100.0), model.draft_time(8, 100.0)
    for _ in range(9):  # the machine runs speculative steps 20% faster than profiled
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 0.8 * (verify_t + draft_t), 0.8 * draft_t))
    # the mean of the timings: the prior only stands until the first (an EMA of 0.05 would be at 0.87)
    assert sel.clock(8).ratio["verify"] == pytest.approx(0.8, abs=0.005)
    assert sel.clock(8).ratio["plain"] == pytest.approx(sel.clock(8).ratio["verify"])  # not timed: follows


def test_each_verify_size_is_priced_at_its_own_timings():
    """Verifies of 0 drafts ran at 1.2x the profile and of 4 drafts at 0.9x: each size bucket is priced at its
    own ratio, one not timed at the ratio of the uniform verifies (the same drafts for every sequence)."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(100):
        sel.observe_step(StepRecord(8, 8, 1, 100.0, 1.2 * model.target_time(8, 8, 100.0) + draft_t, draft_t))
        sel.observe_step(StepRecord(8, 12, 1, 100.0, 0.9 * model.target_time(8, 12, 100.0) + draft_t, draft_t))
    assert [verify_bucket(32, n) for n in (0, 1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 3, 3, 4, 4, 5]
    # forwards short enough for a row plan: one key per token count
    assert [verify_bucket(8, n) for n in (0, 1, 6, 8, 9)] == [0, -9, -14, -16, 5]
    price = sel.prices(8, 100.0)
    assert price.verify[0] == pytest.approx(1.2 * model.target_time(8, 8, 100.0), rel=0.02)
    assert price.verify[4] == pytest.approx(0.9 * model.target_time(8, 12, 100.0), rel=0.02)
    r = sel.clock(8).ratio["verify"]
    assert r == pytest.approx(1.2) and price.verify[2] == pytest.approx(r * model.target_time(8, 10, 100.0))
    # a size's first timing, in a stall, moves its price little: clipped as any settled verify, then one of
    # 1 + SHAPE_PRIOR timings
    sel.observe_step(StepRecord(8, 14, 1, 100.0, 10 * model.target_time(8, 14, 100.0) + draft_t, draft_t))
    assert 1.0 < sel.clock(8).shape[verify_bucket(8, 6)] <= 1 + (SPIKE_SETTLED - 1) / (1 + SHAPE_PRIOR) + 1e-9


def test_short_verifies_are_priced_per_token_count():
    """A row plan that leaves a slow row count unpadded (run AM, batch 8: 14 tokens ran at 101 ms, 16 at 90):
    each token count up to MAX_ROWS learns its own price, and the cheaper, longer verify is chosen."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=1, cost=model)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(SETTLED):
        for tokens in (14, 15):
            sel.observe_step(StepRecord(8, tokens, 1, 100.0, 1.15 * model.target_time(8, tokens, 100.0) + draft_t,
                                        draft_t))
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 0.95 * model.target_time(8, 16, 100.0) + draft_t, draft_t))
    price = sel.prices(8, 100.0)
    assert price.verify[8] < price.verify[6]
    # six confident drafts and two long shots: the two ride along, as 16 tokens cost less than 14
    drafts = torch.log(torch.tensor([[0.9]] * 6 + [[0.1]] * 2))
    assert sel.select(drafts, BatchInfo(8, 100)).tolist() == [1] * 8


def test_a_verify_size_is_priced_no_dearer_than_the_ratio_until_it_is_settled():
    """A size is timed only when chosen: priced out by a few slow first timings, it would never be tried again."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    draft_t, t8, t9 = model.draft_time(8, 100.0), model.target_time(8, 8, 100.0), model.target_time(8, 9, 100.0)
    for _ in range(50):
        sel.observe_step(StepRecord(8, 8, 1, 100.0, t8 + draft_t, draft_t))
    for i in range(SHAPE_SETTLED):  # 1-draft verifies at 1.4x
        sel.observe_step(StepRecord(8, 9, 1, 100.0, 1.4 * t9 + draft_t, draft_t))
        rv, shape = sel.clock(8).ratio["verify"], sel.clock(8).shape[verify_bucket(8, 1)]
        if i < SHAPE_SETTLED - 1:
            assert shape > 1.0 and sel.prices(8, 100.0).verify[1] == pytest.approx(rv * t9)
    assert sel.prices(8, 100.0).verify[1] == pytest.approx(rv * shape * t9) and rv * shape > 1.05


def test_ragged_verifies_do_not_price_the_full_level():
    """Run AP, batch 4: verifies of 5-7 tokens ran at about 1.1x the profile, of 8 (every sequence's draft)
    at 0.99x and plain steps at 0.97x. Until a uniform verify is timed, one not timed is priced no dearer
    than plain steps run; the first one timed sets the verify ratio, the ragged sizes' prices standing; and
    after that ragged verifies move their own sizes' prices only. (The uniform one is timed here at 1.02x:
    a timing is clipped to within SPIKE_SETTLED of its price.)"""
    model = cost(per_token=0.004, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=1, cost=model)
    d = model.draft_time(4, 100.0)

    def verify(tokens: int, ratio: float) -> None:
        sel.observe_step(StepRecord(4, tokens, 1, 100.0, ratio * model.target_time(4, tokens, 100.0) + d, d))

    for _ in range(30):
        for tokens in (5, 6, 7):
            verify(tokens, 1.1)
    for _ in range(10):
        sel.observe_step(StepRecord(4, 4, 0, 100.0, 0.97 * model.target_time(4, 4, 100.0)))
    clock = sel.clock(4)
    assert clock.ratio["verify"] == pytest.approx(1.1)  # no uniform verify yet: the ragged ones set it
    price = sel.prices(4, 100.0)
    assert price.verify[4] == pytest.approx(0.97 * model.target_time(4, 8, 100.0))
    ragged = price.verify[1:4]
    verify(8, 1.02)
    assert clock.ratio["verify"] == pytest.approx(1.02)
    assert sel.prices(4, 100.0).verify[1:4] == pytest.approx(ragged)
    for _ in range(10):
        for tokens in (5, 6, 7):
            verify(tokens, 1.1)
    assert clock.ratio["verify"] == pytest.approx(1.02)
    assert sel.prices(4, 100.0).verify[1:4] == pytest.approx(ragged, rel=0.01)


def test_a_verify_size_not_timed_for_a_while_drifts_back_to_the_ratio():
    """A size priced out (here by timings at 1.1x, a slow spell) is tried again once it has gone 16
    speculative steps untimed: its correction drifts back toward 1.0 by SHAPE_DRIFT a step."""
    model = cost(per_token=0.004, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=1, cost=model)
    d = model.draft_time(8, 100.0)

    def verify(tokens: int, ratio: float) -> None:
        sel.observe_step(StepRecord(8, tokens, 1, 100.0, ratio * model.target_time(8, tokens, 100.0) + d, d))

    for _ in range(2 * SETTLED):
        verify(16, 1.0)
        verify(12, 1.1)
    clock = sel.clock(8)
    dear = clock.shape[verify_bucket(8, 4)]
    assert dear > 1.05
    for _ in range(16):
        verify(16, 1.0)
    assert clock.shape[verify_bucket(8, 4)] == dear
    for _ in range(100):
        verify(16, 1.0)
    assert clock.shape[verify_bucket(8, 4)] == pytest.approx(1 + (dear - 1) * (1 - SHAPE_DRIFT) ** 100)


def test_a_draft_is_verified_where_its_verify_costs_less_than_profiled():
    """At batch 1 the profile charges a 1-draft verify 10% over a plain forward and the host runs it 5% over
    (both measured as verifies): a draft of estimate ~0.075 pays for that, not for the profiled 10%. One
    ratio for every verify size, as timed with both sizes at their mean, prices it at the profile's 10%."""
    model = cost(per_token=0.006, fixed=0.05, draft=0.001)
    one_draft = torch.log(torch.tensor([[0.07]]))
    batch = BatchInfo(1, 100)

    def verified(shaped: bool) -> int:
        sel = AutoTetris(max_depth=1, cost=model)
        t0, t1, d = model.target_time(1, 1, 100.0), model.target_time(1, 2, 100.0), model.draft_time(1, 100.0)
        mean = (t0 + 0.95 * t1) / (t0 + t1)
        for _ in range(100):
            sel.observe_step(StepRecord(1, 1, 1, 100.0, (1.0 if shaped else mean) * t0 + d, d))
            sel.observe_step(StepRecord(1, 2, 1, 100.0, (0.95 if shaped else mean) * t1 + d, d))
        return int(sel.select(one_draft, batch).sum())

    assert verified(shaped=True) == 1 and verified(shaped=False) == 0


def _near_tie(plain_ratio: float | list[float], drafting_first: bool, steps: int = 30) -> list[int]:
    """Depths chosen at batch 8 where the profile puts drafting a few percent ahead of plain decoding
    (or behind, drafting_first=False), when plain steps run at plain_ratio x the profile (a list: the
    n-th plain step at its n-th entry, the last one after) and speculative steps as profiled; each step's
    record follows the depth chosen."""
    ratios = plain_ratio if isinstance(plain_ratio, list) else [plain_ratio]
    model = cost(per_token=0.004, fixed=0.05, draft=0.008 if drafting_first else 0.016)
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)  # no probes: only exploration times both
    batch = BatchInfo(8, 100)
    plain_t, verify_t = model.target_time(8, 8, 100.0), model.target_time(8, 16, 100.0)
    if not drafting_first:  # within EXPLORE_MARGIN behind
        drafting = sel._drafting_rate(batch, [0.0] * 8, sel.prices(8, 100.0), 1.0)[0]
        assert 1 - EXPLORE_MARGIN < drafting * plain_t / 8 < 1
    draft_t = model.draft_time(8, 100.0)
    depths = []
    for _ in range(steps):
        depths.append(sel.depth(batch))
        if depths[-1]:
            sel.observe_step(StepRecord(8, 16, 1, 100.0, verify_t + draft_t, draft_t))
        else:
            ratio = ratios[min(depths.count(0), len(ratios)) - 1]
            sel.observe_step(StepRecord(8, 8, 0, 100.0, ratio * plain_t))
    return depths


def test_near_a_tie_the_kind_of_step_not_yet_timed_is_tried():
    # drafting ahead by the profile: after 8 speculative steps, plain steps are timed 4 times
    assert _near_tie(1.0, True) == [2] * 8 + [0] * 4 + [2] * 18  # as profiled: drafting stays ahead
    assert _near_tie(0.85, True) == [2] * 8 + [0] * 22  # plain decoding runs faster here than profiled
    # plain ahead by the profile: after 8 plain steps, drafting is timed 4 times (probes, which draft for
    # PROBE_ROWS sequences, would not time the verify drafting runs at; this selector makes none)
    assert _near_tie(1.0, False) == [0] * 8 + [2] * 4 + [0] * 18  # as profiled: plain decoding stays ahead
    assert _near_tie(1.15, False) == [0] * 8 + [2] * 22  # plain steps run slower here than profiled


def test_near_a_tie_the_losing_kind_is_timed_again_now_and_then():
    # after every REEXPLORE_AFTER steps of the winner in a row, one of the loser (while within EXPLORE_MARGIN)
    assert _near_tie(1.0, True, 160) == [2] * 8 + [0] * 4 + ([2] * REEXPLORE_AFTER + [0]) * 2 + [2] * 18
    assert _near_tie(1.0, False, 160) == [0] * 8 + [2] * 4 + ([0] * REEXPLORE_AFTER + [2]) * 2 + [0] * 18


def test_a_begun_exploration_is_finished():
    # plain decoding is faster here (0.7x), but its first timing fell in a slow spell (1.3x), after which
    # plain steps look more than EXPLORE_MARGIN behind: they are still timed the rest of EXPLORE_STEPS times
    assert _near_tie([1.3, 0.7], True) == [2] * 8 + [0] * 22
    # the same first timing, then as profiled: drafting stays ahead
    assert _near_tie([1.3, 1.0], True) == [2] * 8 + [0] * 4 + [2] * 18
    # a loser more than twice the margin behind after its first timing is not timed again
    assert _near_tie([2.5, 0.7], True) == [2] * 8 + [0] + [2] * 21
    # drafting timed once (a probe, which drafted for two sequences) is re-timed only within its budget: the
    # rest of the batch has its catch-up still to pay
    clock = StepClock(counts={"plain": EXPLORE_AFTER, "draft": 1, "verify": 1})
    closeness = 1 - 1.5 * EXPLORE_MARGIN
    assert AutoTetris._explore(clock, "verify", closeness, again=True)
    assert not AutoTetris._explore(clock, "verify", closeness, again=False)


def test_far_from_a_tie_nothing_is_explored():
    model = cost(per_token=0.002, fixed=0.05, draft=0.001)  # drafting far ahead
    sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
    verify_t, draft_t = model.target_time(8, 16, 100.0), model.draft_time(8, 100.0)
    depths = []
    for _ in range(20):
        depths.append(sel.depth(BatchInfo(8, 100)))
        sel.observe_step(StepRecord(8, 16, 1, 100.0, verify_t + draft_t, draft_t))
    assert depths == [2] * 20


def test_a_fresh_range_keeps_the_relative_costs_it_started_from():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    plain_t, verify_t = model.target_time(8, 8, 100.0), model.target_time(8, 16, 100.0)
    draft_t = model.draft_time(8, 100.0)
    for _ in range(200):  # at batch 8 plain steps as profiled, speculative ones twice as slow
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
        sel.observe_step(StepRecord(8, 16, 1, 100.0, 2 * (verify_t + draft_t), 2 * draft_t))
    # batch 16, first step, a plain one at 1.5x the profile: it replaces the inherited 1.0, and drafting
    # and verification (not timed here yet) move by the same factor, 2.0 -> 3.0
    sel.observe_step(StepRecord(16, 16, 0, 100.0, 1.5 * model.target_time(16, 16, 100.0)))
    assert sel.clock(16).ratio == pytest.approx({"plain": 1.5, "draft": 3.0, "verify": 3.0}, rel=0.01)


def test_the_first_timing_of_a_kind_replaces_what_it_was_assumed_to_cost():
    # Batch 8 after batch 4 on a host where plain steps at 8 run 50% over the profile but speculative
    # steps as profiled (a sweep's c = 8 had plain decoding at 0.64 of its modelled speed and fixed k=1 at
    # 0.88): verification, not timed at 8 yet, is assumed to have slowed as plain steps did, until a
    # probe times one; from then on its own timing counts, not the assumption.
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    sel.observe_step(StepRecord(4, 4, 0, 100.0, model.target_time(4, 4, 100.0)))  # batch 4 ran as profiled
    for _ in range(20):
        sel.observe_step(StepRecord(8, 8, 0, 100.0, 1.5 * model.target_time(8, 8, 100.0)))
    assert sel.clock(8).ratio["verify"] == pytest.approx(1.5)
    verify_t, draft_t = model.target_time(8, 10, 100.0), model.draft_time(2, 100.0)
    sel.observe_step(StepRecord(8, 10, 2, 100.0, verify_t + 2 * draft_t, 2 * draft_t, draft_rows=2.0))  # a probe
    assert sel.clock(8).ratio["verify"] == pytest.approx(1.0) and sel.clock(8).ratio["draft"] == pytest.approx(1.0)
    assert sel.clock(8).ratio["plain"] == pytest.approx(1.5)


def test_a_verdict_stands_longer_the_clearer_it_is():
    assert reuse_steps(0.03, 100) == reuse_steps(EXPLORE_MARGIN, 100) == REUSE_STEPS  # near a tie: re-priced soon
    assert REUSE_STEPS < reuse_steps(2 * EXPLORE_MARGIN, 100) < reuse_steps(3 * EXPLORE_MARGIN, 100) < REUSE_MAX
    assert reuse_steps(0.9, 100) == REUSE_MAX
    assert reuse_steps(0.9, SETTLED - 1) == REUSE_STEPS  # its kind's clock ratio not settled yet: short


def test_a_clear_plain_verdict_stands_for_a_few_steps():
    never = CostModel.linear(0.001, 0.01, draft_fixed=0.004)  # drafting never pays
    pays = cost(per_token=0.002, fixed=0.05, draft=0.001)  # drafting pays by far
    plain_t = never.target_time(8, 8, 100.0)

    stands = []  # the steps each first verdict stood for

    def depths(batches: list[BatchInfo]) -> list[int]:
        """Priced with `never`, then with `pays`: the steps a verdict still stands for decode plainly."""
        sel = AutoTetris(max_depth=2, cost=never, probe_every=10**6)
        assert sel.depth(batches[0]) == 0
        stands.append(sel.verdict.steps)
        sel.observe_step(StepRecord(8, 8, 0, 100.0, plain_t))
        sel.cost = pays
        out = []
        for b in batches[1:]:
            out.append(sel.depth(b))
            sel.observe_step(StepRecord(b.batch_size, b.batch_size, out[-1], 100.0, plain_t))
        return out

    lagging = [BatchInfo(8, 100, lag_tokens=8 * i, remaining=40 - i) for i in range(40)]
    assert depths(lagging) == [0] * (stands[0] - 1) + [2] * (40 - stands[0])  # re-priced when it lapses
    assert REUSE_STEPS <= stands[0] <= REUSE_MAX
    assert depths([BatchInfo(8, 100), BatchInfo(9, 100)]) == [2]  # another batch size: priced afresh
    # the draft's lag shrank (a request with nothing to catch up on replaced one): priced afresh
    assert depths([BatchInfo(8, 100, lag_tokens=800), BatchInfo(8, 100, lag_tokens=100)]) == [2]
    # more output left (a new request): priced afresh
    assert depths([BatchInfo(8, 100, remaining=10), BatchInfo(8, 100, remaining=50)]) == [2]


def test_a_clear_drafting_verdict_stands_while_nothing_is_left_to_catch_up_on():
    never = CostModel.linear(0.001, 0.01, draft_fixed=0.004)  # drafting never pays
    pays = cost(per_token=0.002, fixed=0.05, draft=0.001)  # drafting pays by far
    stands = []  # the steps each first verdict stood for

    def depths(batches: list[BatchInfo]) -> list[int]:
        """Priced with `pays`, then with `never`: the steps a verdict still stands for draft."""
        def observe(b: BatchInfo, d: int) -> None:  # a step that ran as priced
            B, c = b.batch_size, sel.cost
            draft = d * c.draft_time(B, 100.0)
            sel.observe_step(StepRecord(B, B * (d + 1), d, 100.0, c.target_time(B, B * (d + 1), 100.0) + draft, draft))

        sel = AutoTetris(max_depth=2, cost=pays, probe_every=10**6)
        assert sel.depth(batches[0]) == 2
        stands.append(sel.verdict.steps)
        observe(batches[0], 2)
        sel.cost = never
        out = []
        for b in batches[1:]:
            out.append(sel.depth(b))
            observe(b, out[-1])
        return out

    caught_up = BatchInfo(8, 100, lags=(1,) * 8)
    assert depths([caught_up] * 40) == [2] * (stands[0] - 1) + [0] * (40 - stands[0])  # re-priced when it lapses
    assert REUSE_STEPS <= stands[0] <= REUSE_MAX
    assert depths([caught_up, BatchInfo(9, 100, lags=(1,) * 9)]) == [0]  # another batch size: priced afresh
    # a request entered, or one has more than the first draft forward absorbs to catch up on: priced afresh
    assert depths([caught_up, BatchInfo(8, 100, entering_tokens=50, lags=(1,) * 7 + (50,))]) == [0]
    assert depths([caught_up, BatchInfo(8, 100, lags=(1,) * 7 + (INLINE_CATCH_UP + 1,))]) == [0]


def test_typical_level_means_follow_first_drafts_and_their_moves():
    est = AcceptanceEstimator()
    for _ in range(200):  # first drafts: half confident, half hopeless; confidence keeps its bin
        est.count_transitions(np.array([[0.97, 0.97, 0.97], [0.03, 0.03, 0.03]]))
    levels = est.typical_level_means(3)
    hi = [est.estimate(0.97, j) for j in range(3)]
    lo = [est.estimate(0.03, j) for j in range(3)]
    expected = [0.5 * (np.prod(hi[: d + 1]) + np.prod(lo[: d + 1])) for d in range(3)]
    assert levels == pytest.approx(expected, rel=0.02)  # the pseudo-counts blur the bins a little
    assert list(levels) == sorted(levels, reverse=True)


def test_levels_not_drafted_drop_to_the_projection_at_once():
    """Only the first level is drafted (keep_going stops there): the deeper levels' means, never
    refreshed by drafts, must not stay at an optimistic prior that keeps depth() drafting."""
    sel = AutoTetris(max_depth=3, cost=cost(per_token=0.001))
    assert sel.level_means == pytest.approx(list(sel.estimator.typical_level_means(3)))  # the prior, too
    assert sel.level_means[2] < sel.level_means[1] < sel.level_means[0]
    sel.level_means = [0.5, 0.5, 0.5]  # stale and optimistic, as a flat prior used to be
    sel.select(torch.log(torch.full((8, 1), 0.3)), BatchInfo(8, 0.0))  # one step is enough to drop
    projected = sel.estimator.typical_level_means(3)
    first = sel.level_means[0]
    assert projected[1] < first < 0.5
    assert sel.level_means[1:] == pytest.approx([projected[1], min(projected[2], projected[1])])
    sel.level_means[1] = 0.0  # below the projection: it climbs back by the EMA only
    sel.select(torch.log(torch.full((8, 1), 0.3)), BatchInfo(8, 0.0))
    assert sel.level_means[1] == pytest.approx(0.1 * projected[1])


def test_a_few_unconfident_drafts_at_batch_one_move_the_level_means_little():
    """At batch 1 a step is one request's draft: its weight in the per-depth means is a LEVEL_ROWS-th of a
    full step's, so a short patch of unconfident drafts does not turn drafting off."""
    def after_patch(batch_size: int) -> float:
        sel = AutoTetris(max_depth=2, cost=cost(per_token=0.001))
        sel.level_means = [0.5, 0.3]
        for _ in range(5):
            sel.select(torch.log(torch.full((batch_size, 2), 0.03)), BatchInfo(batch_size, 100.0))
        return sel.level_means[0]

    low = AutoTetris(max_depth=2).estimator.estimate(0.03, 0).item()
    assert after_patch(8) == pytest.approx(low + (0.5 - low) * (1 - LEVEL_WEIGHT) ** 5)
    assert after_patch(1) == pytest.approx(low + (0.5 - low) * (1 - LEVEL_WEIGHT / LEVEL_ROWS) ** 5)
    assert after_patch(1) > 0.45


def test_level_means_drift_back_while_drafting_is_paused():
    """Means left low by a patch of unconfident drafts are not refreshed while nothing is drafted: after
    16 plain steps in a row they drift back to their long-run values, and drafting resumes. At batch 1,
    where most first drafts are unconfident (the median estimate is low, the mean is not), only the
    means say that drafting pays."""
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=1, cost=model, probe_every=10**6)  # no probes: only the drift can restart drafting
    for _ in range(100):  # first drafts: 40% confident, 60% hopeless
        sel.estimator.count_transitions(np.array([[0.97]] * 4 + [[0.03]] * 6))
    baseline = sel.level_baseline = list(sel.estimator.typical_level_means(1))
    assert baseline[0] > 0.3 and sel.estimator.typical_first_estimates(1)[0] < 0.1
    batch = BatchInfo(1, 100)
    sel.level_means = [0.02]
    assert sel.depth(batch) == 0
    plain = StepRecord(1, 1, 0, 100.0, model.target_time(1, 1, 100.0))
    for _ in range(16):  # a short pause keeps them
        sel.observe_step(plain)
    assert sel.level_means == [0.02]
    depths = []
    for _ in range(200):
        sel.observe_step(plain)
        depths.append(sel.depth(batch))
    assert sel.level_means == pytest.approx(baseline, rel=0.05)
    assert depths[0] == 0 and depths[-1] == 1


def test_a_stalled_step_moves_the_clock_little_and_a_slower_host_is_still_followed():
    model = cost(per_token=0.002, fixed=0.05, draft=0.006)
    sel = AutoTetris(max_depth=2, cost=model)
    plain = model.target_time(4, 4, 100.0)
    sel.observe_step(StepRecord(4, 4, 0, 100.0, plain))
    sel.observe_step(StepRecord(4, 4, 0, 100.0, 20 * plain))  # settling: the mean of 1 and at most SPIKE
    assert sel.clock(4).ratio["plain"] == pytest.approx((1 + SPIKE) / 2)
    sel = AutoTetris(max_depth=2, cost=model)
    for _ in range(2 * SETTLED):
        sel.observe_step(StepRecord(4, 4, 0, 100.0, plain))
    sel.observe_step(StepRecord(4, 4, 0, 100.0, 20 * plain))  # the host stalled this step
    assert 1.0 < sel.clock(4).ratio["plain"] <= 1 + (SPIKE_SETTLED - 1) / SETTLED + 1e-9
    for _ in range(4):  # a slow spell of a few steps moves it by at most SPIKE_SETTLED a step
        sel.observe_step(StepRecord(4, 4, 0, 100.0, 2.5 * plain))
    assert sel.clock(4).ratio["plain"] < 1.05
    for _ in range(100):  # from here on the host runs plain steps 1.6x slower
        sel.observe_step(StepRecord(4, 4, 0, 100.0, 1.6 * plain))
    assert sel.clock(4).ratio["plain"] > 1.45


def test_the_first_draft_forward_is_priced_at_the_lags_it_reads():
    """The first draft forward of a step reads each request's short lag too (2 tokens a request after a fully
    accepted draft), the deeper ones one token a request. Timed at the profile's price for those token counts,
    the draft runs as profiled; priced at one token a request for every level, it looked 1.2x slower here (and
    1.45x at c = 8 on session 22's host, where the deeper levels ran at 1.12x) and priced a second level so."""
    model = CostModel.linear(0.05, 0.004, draft_fixed=0.002, draft_per_seq=0.001)
    t, d1, d2 = model.target_time(8, 24, 100.0), model.draft_time(16, 100.0), model.draft_time(8, 100.0)
    record = StepRecord(8, 24, 2, 100.0, t + d1 + d2, d1 + d2, 0.0, 0, 8.0, (16, 8))
    assert model.drafting_time(record) == pytest.approx(d1 + d2)
    assert model.drafting_time(record._replace(draft_tokens=())) == pytest.approx(2 * d2)  # unknown: rows only
    sel = AutoTetris(max_depth=2, cost=model)
    for _ in range(30):
        sel.observe_step(record)
    assert sel.clock(8).ratio["draft"] == pytest.approx(1.0)
    # and drafting is priced so: reading lags makes it dearer, by the first forward's extra tokens only
    price = sel.prices(8, 100.0)
    sel.level_means = [0.9, 0.0]  # one level, verified in full, is the best option
    fresh = sel._drafting_rate(BatchInfo(8, 100.0, lags=(0,) * 8), [0.0] * 8, price, 1.0)[0]
    lagging = sel._drafting_rate(BatchInfo(8, 100.0, lags=(1,) * 8), [1.0] * 8, price, 1.0)[0]
    assert fresh == pytest.approx((8 + 8 * 0.9) / (d2 + price.verify[8]))
    assert lagging == pytest.approx((8 + 8 * 0.9) / (d1 + price.verify[8]))


def test_drafting_resumes_with_a_catch_up_to_pay_only_when_clearly_ahead(monkeypatch):
    """After plain steps, drafting that must first read a long lag (paid at once, priced spread over the output
    left) resumes only when predicted SWITCH_MARGIN faster; with nothing to catch up on, as soon as it is ahead."""
    model = cost(per_token=0.004, fixed=0.05, draft=0.008)
    plain_rate = 8 / model.target_time(8, 8, 100.0)

    def first_choice(lead: float, lag: int) -> int:
        sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
        sel.clock(8).plain_run, sel.clock(8).counts = 5, {"plain": 5, "verify": EXPLORE_AFTER}  # nothing to explore
        monkeypatch.setattr(sel, "_drafting_rate", lambda *a: (lead * plain_rate, None))
        return sel.depth(BatchInfo(8, 100.0, lags=(lag,) * 8))

    assert first_choice(1 + SWITCH_MARGIN / 2, INLINE_CATCH_UP + 1) == 0
    assert first_choice(1 + 2 * SWITCH_MARGIN, INLINE_CATCH_UP + 1) == 2
    assert first_choice(1 + SWITCH_MARGIN / 2, 1) == 2


def test_drafting_is_timed_again_only_when_its_catch_up_is_cheap_next_to_the_plain_steps_since():
    """Re-timing drafting after REEXPLORE_AFTER plain steps pays the catch-up on all of them: it waits until that
    costs at most REEXPLORE_BUDGET of the plain decoding time since drafting last ran."""
    model = CostModel.linear(0.05, 0.004, draft_fixed=0.016, draft_prefill=0.0005)
    plain_time = model.target_time(8, 8, 100.0)

    def choice(lag: int) -> int:
        sel = AutoTetris(max_depth=2, cost=model, probe_every=10**6)
        clock = sel.clock(8)
        clock.plain_run, clock.counts = REEXPLORE_AFTER, {"plain": REEXPLORE_AFTER, "verify": EXPLORE_AFTER}
        sel.plain_seconds = REEXPLORE_AFTER * plain_time
        batch = BatchInfo(8, 100.0, lags=(lag,) * 8, remaining=40, remainings=(40.0,) * 8)
        rate = sel._drafting_rate(batch, [float(lag)] * 8, sel.prices(8, 100.0), 1.0)[0]
        assert 1 - EXPLORE_MARGIN < rate * plain_time / 8 < 1  # near a tie, behind: only exploring drafts
        return sel.depth(batch)

    affordable = int(REEXPLORE_BUDGET * REEXPLORE_AFTER * plain_time / model.draft_prefill / 8)
    assert affordable > INLINE_CATCH_UP
    assert choice(affordable - 1) == 2
    assert choice(affordable * 2) == 0

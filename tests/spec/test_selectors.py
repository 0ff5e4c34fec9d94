"""Selectors: Tetris is optimal for its capacity; fixed-k, DSD behave as specified."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tetrispec.config import SpecConfig
from tetrispec.spec.cost_model import CostModel
from tetrispec.spec.selectors import DSD, BatchInfo, FixedK, Tetris, make_selector, selectable_rows, tetris_select


def expected_accepted(logprobs: torch.Tensor, lengths) -> float:
    cum = logprobs.double().cumsum(1).exp()
    return sum(float(cum[i, :l].sum()) for i, l in enumerate(lengths))


def brute_force(logprobs: torch.Tensor, capacity: int) -> float:
    B, K = logprobs.shape
    best = 0.0
    for lengths in itertools.product(range(K + 1), repeat=B):
        if sum(lengths) <= capacity:
            best = max(best, expected_accepted(logprobs, lengths))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_tetris_select_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, K = 1 + seed % 4, 1 + seed % 3
    if seed % 2:  # a few discrete values: many exact ties
        choices = torch.tensor([math.log(1.0), math.log(0.5), math.log(0.25)])
        logprobs = choices[torch.randint(0, 3, (B, K), generator=g)]
    else:
        logprobs = torch.log(torch.rand(B, K, generator=g).clamp_min(1e-6))
    capacity = int(torch.randint(0, B * K + 2, (1,), generator=g))
    lengths = tetris_select(logprobs, capacity)
    assert lengths.shape == (B,) and lengths.dtype == torch.long
    assert int(lengths.sum()) == min(capacity, B * K)
    assert (lengths >= 0).all() and (lengths <= K).all()
    assert expected_accepted(logprobs, lengths.tolist()) == pytest.approx(brute_force(logprobs, capacity), rel=1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_stopping_unselectable_requests_keeps_the_selection(seed):
    """Drafting level by level and stopping each request once selectable_rows says no gives the
    same tetris_select lengths as drafting everything, ties included."""
    g = torch.Generator().manual_seed(seed)
    B, K = 1 + seed % 5, 2 + seed % 4
    if seed % 2:
        choices = torch.tensor([math.log(1.0), math.log(0.5), math.log(0.25), math.log(0.125)])
        full = choices[torch.randint(0, 4, (B, K), generator=g)]
    else:
        full = torch.log(torch.rand(B, K, generator=g).clamp_min(1e-6))
    capacity = int(torch.randint(0, B * K + 2, (1,), generator=g))
    pruned = torch.full((B, K), float("-inf"))
    active = [True] * B
    for j in range(K):
        for i in range(B):
            if active[i]:
                pruned[i, j] = full[i, j]
        if j + 1 < K:
            keep = selectable_rows(pruned[:, : j + 1], capacity)
            active = [a and k for a, k in zip(active, keep)]
    assert tetris_select(pruned, capacity).tolist() == tetris_select(full, capacity).tolist()


def test_selectable_rows_stops_the_weak_requests_once_capacity_is_drafted():
    logprobs = torch.log(torch.tensor([[0.9, 0.9], [0.9, 0.2], [0.5, 0.5]]))
    assert selectable_rows(logprobs[:, :1], 4) == [True, True, True]  # fewer than C drafted: all go on
    assert selectable_rows(logprobs, 4) == [True, False, False]  # scores .9 .81 / .9 .18 / .5 .25: T = .5
    assert selectable_rows(logprobs, 3) == [False] * 3  # T = .81: row 0's deeper tokens would rank after it
    assert selectable_rows(logprobs, 0) == [False] * 3


def test_tetris_select_ties_never_exceed_capacity():
    logprobs = torch.zeros(4, 3)  # every draft certain: all scores tie
    for c in range(13):
        assert int(tetris_select(logprobs, c).sum()) == c


def test_tetris_prefers_confident_requests():
    logprobs = torch.log(torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.9, 0.9]]))
    assert tetris_select(logprobs, 3).tolist() == [3, 0]


def test_tetris_turn_on_and_capacity():
    t = Tetris(k=2, extra=1, turn_on_batch_size=3)
    assert t.depth(BatchInfo(2, 10)) == 2 and t.depth(BatchInfo(3, 10)) == 3
    assert t.select(torch.zeros(2, 2), BatchInfo(2, 10)).tolist() == [2, 2]
    assert int(t.select(torch.zeros(3, 3), BatchInfo(3, 10)).sum()) == 6
    fixed_c = Tetris(k=2, extra=1, capacity=1)
    assert int(fixed_c.select(torch.zeros(3, 3), BatchInfo(3, 10)).sum()) == 1


def test_fixed_k():
    f = FixedK(3)
    assert f.depth(BatchInfo(5, 1)) == 3
    assert f.select(torch.zeros(5, 3), BatchInfo(5, 1)).tolist() == [3] * 5


def test_dsd_picks_k_by_goodput_and_tracks_acceptance():
    cheap = CostModel.linear(0.05, 0.0, draft_fixed=0.001)  # verify nearly free
    dsd = DSD(max_k=6, interval=20, cost=cheap)
    dsd.alpha = 0.9
    assert dsd.depth(BatchInfo(8, 100)) == 6
    pricey = CostModel.linear(0.01, 0.01, draft_fixed=0.01)  # each token costs
    dsd = DSD(max_k=6, interval=20, cost=pricey)
    dsd.alpha = 0.3
    assert dsd.depth(BatchInfo(32, 100)) == 0
    dsd.observe(torch.zeros(2, 2), [2, 2], [2, 2])
    assert dsd.alpha == pytest.approx(0.85 * 0.3 + 0.15)
    # k is re-chosen only every `interval` steps
    dsd.alpha = 0.99
    dsd.cost = cheap
    assert [dsd.depth(BatchInfo(8, 100)) for _ in range(19)] == [0] * 19
    assert dsd.depth(BatchInfo(8, 100)) == 6


def test_make_selector():
    assert make_selector(SpecConfig(), has_draft=False).name == "none"
    assert make_selector(SpecConfig(), has_draft=True).name == "tetris"
    assert make_selector(SpecConfig(method="fixed", num_speculative_tokens=4), True).max_depth == 4
    assert make_selector(SpecConfig(method="tetris", num_speculative_tokens=2, tetris_extra_proposals=3),
                         True).max_depth == 5


def test_tetris_stops_requests_early_except_under_the_shadow_oracle():
    batch = BatchInfo(4, 10)
    assert make_selector(SpecConfig(method="tetris"), has_draft=True).keep_going(batch) is not None
    assert make_selector(SpecConfig(method="tetris"), has_draft=True).keep_going(BatchInfo(1, 10)) is None  # turned off
    shadow = make_selector(SpecConfig(method="tetris", shadow_oracle=True), has_draft=True)
    assert shadow.keep_going(batch) is None  # the oracle's bound counts every request's full k + e drafts

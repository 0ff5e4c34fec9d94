"""The rejection sampler emits tokens distributed exactly as the target's distributions."""

from __future__ import annotations

import pytest
import torch

from tetrispec.engine.sampler import sample
from tetrispec.spec.rejection_sampler import one_hot, verify, verify_greedy

V = 6


def chi2_ok(samples: torch.Tensor, probs: torch.Tensor) -> bool:
    """Chi-square goodness of fit at p > 1e-4; categories with tiny expectations pooled."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=V).double()
    expected = probs.double() * n
    assert counts[expected == 0].sum() == 0, "a token with target probability 0 was emitted"
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest_c, rest_e = counts[~keep].sum(), expected[~keep].sum()
    df = int(keep.sum()) - 1
    if rest_e > 0:
        stat += (rest_c - rest_e) ** 2 / rest_e
        df += 1
    p = torch.special.gammaincc(torch.tensor(max(df, 1) / 2.0), stat / 2.0)
    return float(p) > 1e-4


def run(p: torch.Tensor, q: torch.Tensor, length: int, n: int, seed: int):
    """n independent requests sharing per-position p [K+1, V] and q [K, V]."""
    g = torch.Generator().manual_seed(seed)
    K = q.shape[0]
    drafts = torch.stack([sample(q[j].expand(n, V), 1 - torch.rand(n, generator=g)) for j in range(K)], 1)
    out = verify(p.expand(n, K + 1, V), drafts, q.expand(n, K, V), torch.full((n,), length),
                 1 - torch.rand(n, K, generator=g), 1 - torch.rand(n, generator=g))
    acc = torch.tensor(out.num_accepted)
    nxt = torch.tensor(out.next_tokens)
    # emitted sequence: accepted drafts then the correction / bonus token
    emitted = [torch.where(acc > j, drafts[:, j], torch.where(acc == j, nxt, -1)) for j in range(K)]
    emitted.append(torch.where(acc == K, nxt, -1))
    return acc, torch.stack(emitted, 1)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("length_offset", [0, -1])
def test_emitted_tokens_follow_target(K, length_offset):
    torch.manual_seed(K)
    p = torch.softmax(torch.randn(K + 1, V) * 1.5, -1)
    p[:, 0] = 0.0  # target never emits token 0
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(torch.randn(K, V) * 1.5, -1)
    q[:, 1] = 0.0  # the draft never proposes token 1, which the target likes
    q[:, 0] += 0.2  # and over-proposes token 0
    q = q / q.sum(-1, keepdim=True)
    length = max(0, K + length_offset)
    acc, emitted = run(p, q, length, n=60_000, seed=K)
    assert (acc <= length).all()
    for j in range(length + 1):
        reached = emitted[:, j] >= 0  # position j is emitted iff all drafts before it were accepted
        assert reached.sum() > 2000
        assert chi2_ok(emitted[reached, j], p[j]), f"position {j} is not distributed as p"


def test_a_lossy_rule_is_caught():
    """Sanity check of the test itself: emitting the draft token unconditionally fails."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, V) * 2, -1)
    q = torch.softmax(torch.randn(1, V) * 2, -1)
    g = torch.Generator().manual_seed(0)
    drafts = sample(q.expand(50_000, V), 1 - torch.rand(50_000, generator=g))
    assert not chi2_ok(drafts, p[0])


def test_greedy_one_hot_rule():
    # target argmax 3, 3, 5 at the three positions; drafts 3, 4 -> accept one, emit argmax 3
    p = torch.zeros(1, 3, V)
    p[0, 0, 3] = p[0, 1, 3] = p[0, 2, 5] = 1.0
    out = verify(p, torch.tensor([[3, 4]]), None, torch.tensor([2]), torch.ones(1, 2), torch.ones(1))
    assert out.num_accepted == [1] and out.next_tokens == [3]
    # all accepted: bonus from the position after the last verified draft
    p[0, 1, 3], p[0, 1, 4] = 0.0, 1.0
    out = verify(p, torch.tensor([[3, 4]]), None, torch.tensor([2]), torch.ones(1, 2), torch.ones(1), oracle=True)
    assert out.num_accepted == [2] and out.next_tokens == [5] and out.oracle_accepted == [2]
    # l = 1: the second draft is never considered, the bonus comes from position 1
    out = verify(p, torch.tensor([[3, 4]]), None, torch.tensor([1]), torch.ones(1, 2), torch.ones(1), oracle=True)
    assert out.num_accepted == [1] and out.next_tokens == [4] and out.oracle_accepted == [2]
    # l = 0: a plain decode step
    out = verify(p, torch.tensor([[9 % V, 4]]), None, torch.tensor([0]), torch.ones(1, 2), torch.ones(1))
    assert out.num_accepted == [0] and out.next_tokens == [3]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_fast_path_equals_one_hot_rule(seed):
    g = torch.Generator().manual_seed(seed)
    B, K = 64, 4
    target = torch.randint(3, (B, K + 1), generator=g)  # a small alphabet makes long accepted runs common
    drafts = torch.randint(3, (B, K), generator=g)
    lengths = torch.randint(K + 1, (B,), generator=g)
    slow = verify(one_hot(target, V), drafts, None, lengths, torch.ones(B, K), torch.ones(B), oracle=True)
    fast = verify_greedy(target, drafts, lengths, oracle=True)
    assert fast == slow
    assert any(a == n > 0 for a, n in zip(fast.num_accepted, lengths.tolist()))  # bonus tokens exercised

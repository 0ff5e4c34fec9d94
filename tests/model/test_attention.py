"""Paged ragged attention equals dense causal attention on both paths (batched and per-sequence)."""

from __future__ import annotations

import pytest
import torch

from tetrispec.model.attention import LONG_QUERY, AttentionMetadata, paged_attention, partition_by_context
from tetrispec.model.cpu_kernel import cpu_ops

N_HEADS, N_KV, HD, BS = 4, 2, 8, 4


def dense_reference(q, keys, values, scale):
    """q [n, H, hd] at the last n positions of keys/values [L, n_kv, hd]."""
    n, L = q.shape[0], keys.shape[0]
    k = keys.repeat_interleave(N_HEADS // N_KV, 1)
    v = values.repeat_interleave(N_HEADS // N_KV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(L - n, L)
    scores = scores.masked_fill(torch.arange(L)[None, None, :] > pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("query_lens", [
    [1, 1, 1],  # decode
    [3, 1, 2],  # ragged verify
    [LONG_QUERY + 5, 1, 7],  # one long query sends the whole step to the per-sequence path
    [LONG_QUERY + 3, LONG_QUERY + 9],  # fresh prompts and a long query over cached context
])
def test_matches_dense_attention(query_lens):
    cached = [0 if q > LONG_QUERY and i % 2 == 0 else 5 + 3 * i for i, q in enumerate(query_lens)]
    meta = check_against_dense(query_lens, cached)
    assert (meta.spans is not None) == (max(query_lens) > LONG_QUERY)
    assert meta.buckets is None  # similar short contexts: one gather for the batch


def test_mixed_contexts_are_bucketed_and_still_exact():
    # long and short contexts interleaved in the batch order, with ragged verify queries
    meta = check_against_dense([1, 2, 1, 3, 1, 1], [700, 3, 650, 9, 2, 690])
    assert meta.buckets is not None and len(meta.buckets) == 2
    rows = sorted(t for r, _ in meta.buckets for t in r.tolist())
    assert rows == list(range(9))
    assert meta.gather_blocks == max(m.block_index.numel() for _, m in meta.buckets)


def test_partition_by_context():
    assert partition_by_context([10] * 8, 16, 512) == [list(range(8))]
    groups = partition_by_context([2, 60, 3, 58, 1], 16, 512)
    assert groups == [[4, 0, 2], [3, 1]]
    assert partition_by_context([2, 60], 16, call_cost=10**6) == [[0, 1]]  # calls too dear: one bucket


def test_partition_by_context_is_optimal_with_ties():
    """Cutting only between distinct contexts loses nothing: brute force over every cut of the sorted order."""
    g = torch.Generator().manual_seed(0)

    def cost(groups, blocks, call):
        return sum(len(gr) * max(blocks[i] for i in gr) * 16 + call for gr in groups)

    for _ in range(60):
        n = int(torch.randint(1, 9, (1,), generator=g))
        blocks = torch.randint(1, 6, (n,), generator=g).mul(int(torch.randint(1, 20, (1,), generator=g))).tolist()
        call = int(torch.randint(0, 400, (1,), generator=g))
        groups = partition_by_context(blocks, 16, call)
        assert sorted(i for gr in groups for i in gr) == list(range(n))
        order = sorted(range(n), key=blocks.__getitem__)
        brute = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], blocks, call)
                    for mask in range(2 ** (n - 1))
                    for cuts in [tuple(j + 1 for j in range(n - 1) if mask >> j & 1)])
        assert cost(groups, blocks, call) == brute


needs_kernel = pytest.mark.skipif(cpu_ops() is None, reason="the CPU kernel did not build here "
                                  "(no C++ compiler or ninja); the PyTorch path is tested above")


@needs_kernel
@pytest.mark.parametrize("query_lens,cached", [
    ([1, 1, 1], [5, 8, 11]),  # decode
    ([3, 1, 2, LONG_QUERY], [0, 7, 30, 2]),  # ragged verify; a fresh 3-token query; block-boundary contexts
    ([1, 2, 1, 3, 1, 1], [700, 3, 650, 9, 2, 690]),  # long and short contexts side by side, no padding
])
def test_cpu_kernel_matches_dense_attention(query_lens, cached):
    meta = check_against_dense(query_lens, cached, kernel=True)
    assert meta.kernel_args is not None and meta.mask is None and meta.gather_blocks == 0


@needs_kernel
def test_cpu_kernel_reads_views_of_one_fused_projection():
    """q, k and v as the model hands them over: strided views into one [T, (heads + 2 kv) * hd] tensor."""
    meta = check_against_dense([1, 3, 2], [20, 5, 33], kernel=True, fused_views=True)
    assert meta.kernel_args is not None and meta.mask is None and meta.gather_blocks == 0


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_precision_caches(dtype):
    check_against_dense([2, 1, 4], [40, 3, 17], kernel=True, dtype=dtype)


def check_against_dense(query_lens: list[int], cached: list[int], kernel: bool = False,
                        dtype: torch.dtype = torch.float32, fused_views: bool = False) -> AttentionMetadata:
    g = torch.Generator().manual_seed(sum(query_lens))
    context = [c + q for c, q in zip(cached, query_lens)]
    num_blocks = sum(-(-c // BS) for c in context) + 3
    k_cache = torch.zeros(num_blocks * BS, N_KV, HD)
    v_cache = torch.zeros(num_blocks * BS, N_KV, HD)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the pool
    tables, full_k, full_v = [], [], []
    for c, L in zip(cached, context):
        table = [perm.pop() for _ in range(-(-L // BS))]
        tables.append(table)
        keys, values = torch.randn(L, N_KV, HD, generator=g), torch.randn(L, N_KV, HD, generator=g)
        full_k.append(keys)
        full_v.append(values)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(c)], dtype=torch.long)
        k_cache[slots], v_cache[slots] = keys[:c], values[:c]
    meta = AttentionMetadata.build(query_lens, context, tables, BS, torch.device("cpu"), kernel=kernel)
    q = torch.randn(sum(query_lens), N_HEADS, HD, generator=g)
    k = torch.cat([fk[c:] for fk, c in zip(full_k, cached)])
    v = torch.cat([fv[c:] for fv, c in zip(full_v, cached)])
    if dtype != torch.float32:  # the reference sees the same rounded values, in float32
        q, k, v, k_cache, v_cache = (t.to(dtype) for t in (q, k, v, k_cache, v_cache))
        full_k, full_v = [t.to(dtype).float() for t in full_k], [t.to(dtype).float() for t in full_v]
    if fused_views:
        T = q.shape[0]
        qkv = torch.cat([q.view(T, -1), k.view(T, -1), v.view(T, -1)], 1)
        q, k, v = (part.view(T, -1, HD) for part in qkv.split([N_HEADS * HD, N_KV * HD, N_KV * HD], 1))
    out = paged_attention(q, k, v, k_cache, v_cache, meta, HD**-0.5)
    assert out.dtype == dtype
    assert torch.equal(k_cache[meta.slot_mapping], k) and torch.equal(v_cache[meta.slot_mapping], v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for n, fk, fv in zip(query_lens, full_k, full_v):
        expected = dense_reference(q[start : start + n].float(), fk, fv, HD**-0.5)
        torch.testing.assert_close(out[start : start + n].float(), expected, atol=tol, rtol=tol)
        start += n
    return meta

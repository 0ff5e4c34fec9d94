"""Ragged causal attention over a paged KV cache.

One batch may mix prefill chunks, single-token decodes and multi-token verify queries.
The cache of one layer is a flat pool of slots [num_slots, n_kv, head_dim]; a slot is
block_id * block_size + offset. Per step we build, once for all layers, the slot index of
every key each sequence sees, padded to the longest context, and a causal mask; each layer
then does one gather and one SDPA call for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    kv_index: torch.Tensor  # [B, L] slots of the keys each sequence attends to (padded)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool, True = attend; None for all-decode batches
    q_batch: torch.Tensor | None  # [T] sequence of each query token (None: uniform Q, no padding)
    q_pos: torch.Tensor | None  # [T] index of each query token inside its padded row
    num_seqs: int
    max_q: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """query_lens[i] new tokens of sequence i end at context_lens[i] (cache included)."""
        B = len(query_lens)
        max_q, max_l = max(query_lens), max(context_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], device=device)
        key = torch.arange(max_l, device=device)
        lens = torch.tensor(context_lens, device=device)
        kv_index = tables[:, key // block_size] * block_size + key % block_size  # [B, L]
        kv_index = kv_index.masked_fill(key[None, :] >= lens[:, None], 0)
        qlens = torch.tensor(query_lens, device=device)
        # position of each query token; padded query rows look at key 0 only (discarded)
        qidx = torch.arange(max_q, device=device)
        qpos = lens[:, None] - qlens[:, None] + qidx[None, :]  # [B, Q]
        qvalid = qidx[None, :] < qlens[:, None]
        qpos = qpos.masked_fill(~qvalid, 0)
        slot_mapping = kv_index.gather(1, qpos)[qvalid]  # [T]
        uniform = all(q == max_q for q in query_lens)
        mask = None
        if not (uniform and max_q == 1 and all(c == max_l for c in context_lens)):
            mask = (key[None, None, :] <= qpos[:, :, None]) & (key[None, None, :] < lens[:, None, None])
            mask = mask.unsqueeze(1)
        q_batch = q_pos = None
        if not uniform:
            q_batch, q_pos = qvalid.nonzero(as_tuple=True)
        return cls(slot_mapping, kv_index, mask, q_batch, q_pos, B, max_q)


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, hd]
    k: torch.Tensor,  # [T, n_kv, hd]
    v: torch.Tensor,  # [T, n_kv, hd]
    k_cache: torch.Tensor,  # [num_slots, n_kv, hd]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, n_heads, hd]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    B, Q = meta.num_seqs, meta.max_q
    keys = k_cache[meta.kv_index].transpose(1, 2)  # [B, n_kv, L, hd]
    values = v_cache[meta.kv_index].transpose(1, 2)
    if meta.q_batch is None:
        queries = q.view(B, Q, *q.shape[1:])
    else:
        queries = q.new_zeros(B, Q, *q.shape[1:])
        queries[meta.q_batch, meta.q_pos] = q
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        keys = keys.repeat_interleave(n_rep, dim=1)
        values = values.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=meta.mask, scale=scale
    ).transpose(1, 2)  # [B, Q, n_heads, hd]
    if meta.q_batch is None:
        return out.reshape(q.shape)
    return out[meta.q_batch, meta.q_pos]

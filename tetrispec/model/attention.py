"""Ragged causal attention over a paged KV cache.

One batch may mix prefill chunks, single-token decodes and multi-token verify queries.
The cache of one layer is a flat pool of slots [num_slots, n_kv, head_dim]; a slot is
block_id * block_size + offset. Three paths, chosen once per step for all layers:
- short queries on CPU when the C++ kernel built (cpu_kernel.py): it writes the new keys and
  values, walks each sequence's block table and reads the cache in place, so there is no gather,
  padding or mask;
- other short queries (decode, verify: at most LONG_QUERY tokens per sequence): the slot index of
  every key each sequence sees, padded to the longest context, and a causal mask; each layer
  does one gather and one SDPA call per bucket of sequences. Padding every row to the longest
  context makes one 1,000-token prompt cost 32 x 1,000 keys in a batch of 32 short ones, so the
  sequences are sorted by context and cut into buckets where the keys saved pay for the extra
  call (partition_by_context);
- any longer query (prefill, a draft catching up): one SDPA call per sequence, so that one
  long prompt does not pad every other sequence's query rows. A fresh prompt attends over its
  own new keys (no cache gather at all); a query with cached context gathers its own blocks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tetrispec.model.cpu_kernel import cpu_ops

LONG_QUERY = 16  # a sequence with more new tokens than this sends the step to the per-sequence path
CALL_COST_KEYS = 2048  # one more gather + SDPA call per layer costs about as much as this many padded keys
# On a GPU a call is a handful of kernel launches (~50 us) while gathering a key is bandwidth
# (~1 KB at 3 TB/s): the break-even is some 10^5 keys, so a GPU batch is almost never cut.
CUDA_CALL_COST_KEYS = 65536


def partition_by_context(num_blocks: list[int], block_size: int, call_cost: int) -> list[list[int]]:
    """Sequences (given their context in blocks) grouped into buckets of similar context.

    Sorted by context, a bucket of sequences i..j-1 costs (j - i) x its longest context in
    gathered keys, plus call_cost for its own call; the cheapest cut is a small dynamic program.
    Cuts fall only between different contexts (moving a tie down into the lower bucket never
    costs more), so the program runs over distinct contexts, not sequences.
    """
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__)
    values = [num_blocks[i] for i in order]
    ends = [j for j in range(1, len(values) + 1) if j == len(values) or values[j] != values[j - 1]]
    cuts = [0, *ends]  # candidate bucket boundaries, as positions in the sorted order
    best, prev = [0.0] + [float("inf")] * len(ends), [0] * (len(ends) + 1)
    for b in range(1, len(cuts)):
        j = cuts[b]
        for a in range(b):
            c = best[a] + (j - cuts[a]) * values[j - 1] * block_size + call_cost
            if c < best[b]:
                best[b], prev[b] = c, a
    groups, b = [], len(cuts) - 1
    while b > 0:
        groups.append(order[cuts[prev[b]]:cuts[b]])
        b = prev[b]
    return groups[::-1]


@dataclass
class SeqSpan:
    start: int  # first token of the sequence in the flat batch
    end: int
    context_len: int  # cache included, the new tokens last
    blocks: torch.Tensor | None  # block ids to gather; None for a fresh prompt (its keys are all new)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    block_index: torch.Tensor  # [B * max_blocks] each sequence's block table, padded with block 0
    block_size: int
    mask: torch.Tensor | None  # [B, 1, Q, L] bool, True = attend; None for all-decode batches
    q_batch: torch.Tensor | None  # [T] sequence of each query token (None: uniform Q, no padding)
    q_pos: torch.Tensor | None  # [T] index of each query token inside its padded row
    num_seqs: int
    max_q: int
    # Per-sequence path (long queries): one SeqSpan per sequence, None on the batched path.
    spans: list[SeqSpan] | None = None
    # Batched path cut into buckets of similar context: (token rows of the bucket in the flat
    # batch, the bucket's own metadata); None when the whole batch is one bucket.
    buckets: list[tuple[torch.Tensor, AttentionMetadata]] | None = None
    # CPU kernel path (cpu_kernel.py): block tables [B, max_blocks], query row starts [B + 1] and
    # context lengths [B], all int64; the kernel reads the cache in place (no gather, no mask).
    kernel_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Reused buffers the gathered keys and values are written into (flat, at least
    # gather_blocks * block_size * n_kv * head_dim each): writing into memory that is already
    # mapped costs about half of allocating fresh multi-megabyte tensors every layer.
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def gather_blocks(self) -> int:
        """Blocks the largest single gather reads (buckets run one after another)."""
        if self.kernel_args is not None:
            return 0
        if self.buckets is not None:
            return max(m.block_index.numel() for _, m in self.buckets)
        return self.block_index.numel()

    def grouped_mask(self, n_rep: int) -> torch.Tensor | None:
        """The mask for n_rep query heads folded into the query rows (cached per n_rep)."""
        if self.mask is None or n_rep == 1:
            return self.mask
        cache = self.__dict__.setdefault("_grouped", {})
        if n_rep not in cache:
            cache[n_rep] = self.mask.repeat(1, 1, n_rep, 1)  # row r * Q + q: query q of head r
        return cache[n_rep]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        bucket: bool = True,
        kernel: bool = False,
    ) -> AttentionMetadata:
        """query_lens[i] new tokens of sequence i end at context_lens[i] (cache included).
        kernel: short-query batches go to the CPU kernel, which needs no mask, padding or buckets."""
        B = len(query_lens)
        max_q = max(query_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], device=device)
        # Keys are gathered whole blocks at a time (a contiguous copy per block, far cheaper
        # than a per-slot gather), so each row holds max_blocks * block_size keys.
        max_l = max_blocks * block_size
        lens = torch.tensor(context_lens, device=device)
        qlens = torch.tensor(query_lens, device=device)
        # position of each query token; padded query rows look at key 0 only (discarded)
        qidx = torch.arange(max_q, device=device)
        qpos = lens[:, None] - qlens[:, None] + qidx[None, :]  # [B, Q]
        qvalid = qidx[None, :] < qlens[:, None]
        qpos = qpos.masked_fill(~qvalid, 0)
        slot_mapping = (tables.gather(1, qpos // block_size) * block_size + qpos % block_size)[qvalid]  # [T]
        empty = torch.empty(0, dtype=torch.long, device=device)
        if max_q > LONG_QUERY:
            ends = list(itertools.accumulate(query_lens))
            spans = [SeqSpan(end - q, end, c, None if q == c else torch.tensor(t[: -(-c // block_size)], device=device))
                     for q, c, t, end in zip(query_lens, context_lens, block_tables, ends)]
            return cls(slot_mapping, empty, block_size, None, None, None, B, max_q, spans=spans)
        if kernel:
            q_start = torch.tensor([0, *itertools.accumulate(query_lens)], device=device)
            return cls(slot_mapping, empty, block_size, None, None, None, B, max_q,
                       kernel_args=(tables, q_start, lens))
        if bucket and B > 1:
            call_cost = CALL_COST_KEYS if torch.device(device).type == "cpu" else CUDA_CALL_COST_KEYS
            groups = partition_by_context([-(-c // block_size) for c in context_lens], block_size, call_cost)
            if len(groups) > 1:
                starts = [0, *itertools.accumulate(query_lens)]
                buckets = []
                for g in groups:
                    rows = torch.tensor([t for i in g for t in range(starts[i], starts[i + 1])], device=device)
                    sub = cls.build([query_lens[i] for i in g], [context_lens[i] for i in g],
                                    [block_tables[i] for i in g], block_size, device, bucket=False)
                    buckets.append((rows, sub))
                return cls(slot_mapping, empty, block_size, None, None, None, B, max_q, buckets=buckets)
        uniform = all(q == max_q for q in query_lens)
        mask = None
        if not (uniform and max_q == 1 and all(c == max_l for c in context_lens)):
            key = torch.arange(max_l, device=device)
            mask = (key[None, None, :] <= qpos[:, :, None]) & (key[None, None, :] < lens[:, None, None])
            mask = mask.unsqueeze(1)
        q_batch = q_pos = None
        if not uniform:
            q_batch, q_pos = qvalid.nonzero(as_tuple=True)
        return cls(slot_mapping, tables.view(-1), block_size, mask, q_batch, q_pos, B, max_q)


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, hd]
    k: torch.Tensor,  # [T, n_kv, hd]
    v: torch.Tensor,  # [T, n_kv, hd]
    k_cache: torch.Tensor,  # [num_slots, n_kv, hd]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, n_heads, hd]
    if meta.kernel_args is not None:  # the kernel writes the new keys and values itself
        return cpu_ops().paged_attention(q, k, v, meta.slot_mapping, k_cache, v_cache, *meta.kernel_args,
                                         meta.block_size, scale)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.spans is not None:
        return _per_sequence_attention(q, k, v, k_cache, v_cache, meta, scale)
    if meta.buckets is None:
        return _batched_attention(q, k_cache, v_cache, meta, scale, meta.workspace)
    out = torch.empty_like(q)
    for rows, sub in meta.buckets:
        out.index_copy_(0, rows, _batched_attention(q.index_select(0, rows), k_cache, v_cache, sub, scale,
                                                    meta.workspace))
    return out


def _batched_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                       scale: float, workspace: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One gather of every sequence's blocks (padded to the longest) and one SDPA call."""
    B, Q = meta.num_seqs, meta.max_q
    n_heads, n_kv, hd = q.shape[1], k_cache.shape[1], q.shape[2]
    n_rep = n_heads // n_kv
    bs = meta.block_size
    keys, values = (_gather(cache.view(-1, bs, n_kv, hd), meta.block_index, buf).view(B, -1, n_kv, hd).transpose(1, 2)
                    for cache, buf in zip((k_cache, v_cache), workspace or (None, None)))
    if meta.q_batch is None:
        queries = q.view(B, Q, n_heads, hd)
    else:
        queries = q.new_zeros(B, Q, n_heads, hd)
        queries[meta.q_batch, meta.q_pos] = q
    # Grouped-query attention without copying K/V per head: the n_rep query heads that share
    # a KV head become extra query rows, [B, n_kv, n_rep * Q, hd].
    queries = queries.view(B, Q, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B, n_kv, n_rep * Q, hd)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.grouped_mask(n_rep), scale=scale)
    out = out.view(B, n_kv, n_rep, Q, hd).permute(0, 3, 1, 2, 4).reshape(B, Q, n_heads, hd)
    if meta.q_batch is None:
        return out.reshape(q.shape)
    return out[meta.q_batch, meta.q_pos]


def _gather(blocks: torch.Tensor, index: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """blocks[index], written into buf when one is given."""
    if buf is None:
        return blocks.index_select(0, index)
    out = buf[: index.numel() * blocks[0].numel()].view(index.numel(), *blocks.shape[1:])
    return torch.index_select(blocks, 0, index, out=out)


def _per_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention one sequence at a time: cost sum(q_i * l_i), not B * max(q) * max(l)."""
    n_kv, hd = k.shape[1], k.shape[2]
    n_rep = q.shape[1] // n_kv
    out = torch.empty_like(q)
    for span in meta.spans:
        n = span.end - span.start
        if span.blocks is None:  # fresh prompt: its keys are exactly the new ones
            keys, values, mask = k[span.start : span.end], v[span.start : span.end], None
        else:
            keys, values = (cache.view(-1, meta.block_size, n_kv, hd).index_select(0, span.blocks)
                            .view(-1, n_kv, hd)[: span.context_len] for cache in (k_cache, v_cache))
            positions = torch.arange(span.context_len - n, span.context_len, device=q.device)
            mask = torch.arange(span.context_len, device=q.device)[None, :] <= positions[:, None]  # [n, L]
        if n_rep > 1:  # CPU SDPA has no fast grouped-query path; repeating K/V is cheap next to the scores
            keys, values = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
        qs, ks, vs = (t[None].transpose(1, 2) for t in (q[span.start : span.end], keys, values))  # [1, heads, *, hd]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out

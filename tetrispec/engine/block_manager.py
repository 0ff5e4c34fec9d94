"""Paged KV cache bookkeeping: which blocks of the shared pool each sequence owns.

Target and draft caches are two pools with the same geometry, addressed by the same block
table: both models see the same token positions, so one table serves both.
"""

from __future__ import annotations

from collections import deque

from tetrispec.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    def can_reserve(self, seq: Sequence, num_slots: int) -> bool:
        return self.blocks_for(num_slots) - len(seq.block_table) <= self.num_free

    def reserve(self, seq: Sequence, num_slots: int) -> None:
        """Grow seq's table to hold num_slots positions (KV for tokens plus lookahead)."""
        need = self.blocks_for(num_slots) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError("out of KV blocks; check can_reserve first")
        for _ in range(need):
            seq.block_table.append(self.free_blocks.popleft())

    def truncate(self, seq: Sequence, num_slots: int) -> None:
        """Roll back: return blocks past num_slots positions (rejected drafts' entries)."""
        keep = self.blocks_for(num_slots)
        while len(seq.block_table) > keep:
            self.free_blocks.append(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached = seq.num_draft_cached = 0

"""Continuous batching: FCFS admission, lookahead KV reservation, preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tetrispec.engine.block_manager import BlockManager
from tetrispec.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    lookahead_ok: bool = True  # every sequence has KV room for the speculative positions


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int) -> ScheduledBatch:
        """Pick the next batch: waiting prompts first (prefill), else every running sequence.

        A decode batch reserves KV room for its last token plus `lookahead` speculative
        positions; when blocks run out the youngest running sequence is preempted (its
        blocks freed, its tokens recomputed by a later prefill) so the older ones progress.
        """
        batch: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_reserve(seq, seq.num_tokens + 1 + lookahead):
                break
            self.block_manager.reserve(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            num_tokens += seq.num_tokens
            batch.append(self.waiting.popleft())
        if batch:
            self.running.extend(batch)
            return ScheduledBatch(batch, True)

        batch = []
        lookahead_ok = True
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            need = seq.num_tokens + lookahead
            while not self.block_manager.can_reserve(seq, need) and queue:
                self._preempt(queue.pop())
            if not self.block_manager.can_reserve(seq, need):
                # Alone and still no room for speculation: fall back to the plain step.
                need = seq.num_tokens
                lookahead_ok = False
                if not self.block_manager.can_reserve(seq, need):
                    self._preempt(seq)
                    continue
            self.block_manager.reserve(seq, need)
            batch.append(seq)
        self.running = batch
        return ScheduledBatch(list(batch), False, lookahead_ok)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    return seq
        return None

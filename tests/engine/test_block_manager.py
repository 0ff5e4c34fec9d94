import pytest
import torch

from tetrispec import SamplingParams
from tetrispec.engine.block_manager import BlockManager
from tetrispec.engine.scheduler import Scheduler
from tetrispec.engine.sequence import Sequence, SequenceStatus


def seq(n: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams())


def test_reserve_truncate_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(5)
    bm.reserve(s, 5)
    assert len(s.block_table) == 2 and bm.num_free == 8
    bm.reserve(s, 13)  # lookahead
    assert len(s.block_table) == 4
    bm.truncate(s, 6)  # rollback of rejected drafts
    assert len(s.block_table) == 2 and bm.num_free == 8
    assert not bm.can_reserve(s, 100)
    with pytest.raises(RuntimeError):
        bm.reserve(s, 100)
    bm.free(s)
    assert bm.num_free == 10 and s.block_table == []
    assert len(set(bm.free_blocks)) == 10


def test_scheduler_prefills_first_then_preempts_youngest():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(7, "a"), seq(7, "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule(lookahead=0)
    assert batch.is_prefill and batch.seqs == [a, b]
    for s in (a, b):
        s.token_ids += [1, 2]  # both grow to 9 tokens: 3 blocks each, 6 in all
    batch = sched.schedule(lookahead=4)  # a needs 4 blocks now: b is preempted
    assert not batch.is_prefill and batch.seqs == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    sched.finish(a)
    assert bm.num_free == 6


def test_sequence_generator_only_when_seeded():
    assert seq(3).generator is None
    s = Sequence("x", [1], SamplingParams(seed=3))
    assert torch.rand(1, generator=s.generator).item() == torch.rand(
        1, generator=torch.Generator().manual_seed(3)).item()

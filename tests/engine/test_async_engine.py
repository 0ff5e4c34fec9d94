"""AsyncEngine: the background step loop the server runs on (tiny model, so every test is fast)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams
from tetrispec.engine.async_engine import AsyncEngine, EngineClosedError, RequestDelta

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_pair) -> LLM:
    return LLM(tiny_pair[0], spec_method="none", max_num_seqs=4, max_model_len=512, num_kv_blocks=256)


@pytest.fixture(scope="module")
def offline(llm) -> list:
    return llm.generate(mixed_prompts(8), GREEDY)


@pytest.fixture
def aengine(llm, offline):
    """A fresh engine thread per test over the module's engine (offline outputs come first)."""
    engine = AsyncEngine(llm.engine).start()
    yield engine
    engine.shutdown(drain=False, timeout=10)
    assert not engine._thread.is_alive()


async def collect(engine: AsyncEngine, prompt, params: SamplingParams) -> list[RequestDelta]:
    stream = await engine.add_request(prompt, params)
    return [d async for d in stream]


def wait_until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_concurrent_streams_match_offline(aengine, offline):
    prompts = mixed_prompts(8)
    seen_running = []
    aengine.add_listener(lambda d: seen_running.append(aengine.engine.scheduler.running.__len__()))

    async def main():
        return await asyncio.gather(*(collect(aengine, p, GREEDY) for p in prompts))

    for deltas, ref in zip(asyncio.run(main()), offline):
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert "".join(d.text for d in deltas) == ref.text
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        last = deltas[-1]
        assert last.finish_reason == "length" and last.num_output_tokens == 12
        assert last.spec["request_steps"] == 11 and last.first_token_time >= last.arrival_time
        assert deltas[0].prev_time is None and all(d.prev_time is not None for d in deltas[1:])
    assert max(seen_running) == 4, "requests must be batched together (max_num_seqs=4)"
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)


def test_stop_string_never_retracts_streamed_text(aengine, offline, llm):
    """A stop string that spans two steps: its first character must be held back, not sent."""
    ref, ids = offline[0].text, offline[0].token_ids
    bounds = [len(llm.tokenizer.decode(ids[:k])) for k in range(1, len(ids))]  # where each step's text ends
    at = next(b - 1 for b in bounds if 1 <= b - 1 and b + 1 <= len(ref) and ref.find(ref[b - 1:b + 1]) == b - 1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=ref[at:at + 2])
    deltas = asyncio.run(collect(aengine, mixed_prompts(1)[0], params))
    assert "".join(d.text for d in deltas) == ref[:at]
    assert deltas[-1].finish_reason == "stop"


def test_group_streams_every_request_with_its_index(aengine, offline, llm):
    """A list of params: one engine request each, on one stream; deltas (logprobs included) say whose."""
    prompt = mixed_prompts(1)[0]
    group = [GREEDY, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2), GREEDY]
    ref = llm.generate(prompt, group[1], use_tqdm=False)[0]

    async def main():
        stream = await aengine.add_request(prompt, group, request_id="g")
        assert stream.request_ids == ["g-0", "g-1", "g-2"] and not stream.finished
        return stream, [d async for d in stream]

    stream, deltas = asyncio.run(main())
    assert stream.finished and {d.index for d in deltas} == {0, 1, 2}
    assert all(d.request_id == f"g-{d.index}" for d in deltas)
    by_index = [[d for d in deltas if d.index == i] for i in range(3)]
    for i in (0, 2):
        assert "".join(d.text for d in by_index[i]) == offline[0].text
        assert all(d.logprobs is None for d in by_index[i])
    assert [t for d in by_index[1] for t in d.token_ids] == ref.token_ids
    assert [e.token_id for d in by_index[1] for e in d.logprobs] == ref.token_ids
    assert [e.logprob for d in by_index[1] for e in d.logprobs] == pytest.approx([e.logprob for e in ref.logprobs],
                                                                                abs=1e-4)
    assert by_index[1][-1].finished and by_index[1][-1].spec["request_steps"] == 4
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)


def test_leaving_a_group_aborts_every_request(aengine):
    reasons = []
    aengine.add_listener(lambda d: reasons.append(d.finish_reason) if d.finished else None)

    async def main():
        stream = await aengine.add_request("The capital of France is", [LONG] * 3)
        async with stream:
            async for delta in stream:
                if delta.num_output_tokens >= 3:
                    break
        return stream

    assert asyncio.run(main()).finished
    wait_until(lambda: not aengine.engine.has_unfinished() and aengine.num_waiting() == 0)
    assert reasons == ["abort"] * 3
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)


def test_leaving_a_stream_aborts_and_frees_blocks(aengine):
    async def main():
        stream = await aengine.add_request("The capital of France is", LONG)
        async with stream:
            async for delta in stream:
                if delta.num_output_tokens >= 3:
                    break
        return stream

    stream = asyncio.run(main())
    assert stream.finished
    wait_until(lambda: not aengine.engine.has_unfinished() and aengine.num_waiting() == 0)
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)
    assert aengine.engine.block_manager.num_free == aengine.engine.block_manager.num_blocks


def test_cancelled_task_aborts(aengine):
    async def main():
        started = asyncio.Event()
        deltas = []

        async def consume():
            stream = await aengine.add_request("Paris", LONG)
            async for delta in stream:
                deltas.append(delta)
                started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()  # cancelled mid-generation (a fixed sleep can outlast 400 tokens on a fast host)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not deltas[-1].finished

    asyncio.run(main())
    wait_until(lambda: not aengine.engine.has_unfinished())
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)


def test_bad_input_raises_and_others_go_on(aengine, offline, llm):
    async def main():
        good = asyncio.ensure_future(collect(aengine, mixed_prompts(1)[0], GREEDY))
        errors = []
        for prompt in ("", "x " * 600, [10**9]):
            with pytest.raises(ValueError) as e:
                await aengine.add_request(prompt, GREEDY)
            errors.append(str(e.value))
        with pytest.raises(ValueError, match="empty"):  # a group is refused as a whole
            await aengine.add_request("", [GREEDY, GREEDY])
        stream = await aengine.add_request("Paris", GREEDY, request_id="dup")
        with pytest.raises(ValueError, match="already running"):
            await aengine.add_request("Paris", GREEDY, request_id="dup")
        async for _ in stream:
            pass
        return errors, await good

    errors, deltas = asyncio.run(main())
    assert "empty" in errors[0] and "context limit" in errors[1] and "token ids" in errors[2]
    assert "".join(d.text for d in deltas) == offline[0].text


def test_failed_step_fails_only_its_requests(aengine, offline):
    engine = aengine.engine
    real_step = engine.step
    calls = []

    def failing_step():
        if engine.scheduler.running and not calls:
            calls.append(1)
            raise RuntimeError("injected fault")
        return real_step()

    async def main():
        first = await collect(aengine, "Paris", LONG)
        second = await collect(aengine, mixed_prompts(1)[0], GREEDY)
        return first, second

    engine.step = failing_step
    try:
        first, second = asyncio.run(main())
    finally:
        del engine.step
    assert first[-1].finish_reason == "error" and "injected fault" in first[-1].error
    assert "".join(d.text for d in second) == offline[0].text
    assert aengine.is_running
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)


def _thread_cpu_ticks(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_thread_sleeps(aengine):
    asyncio.run(collect(aengine, "Paris", GREEDY))
    time.sleep(0.1)
    before = _thread_cpu_ticks(aengine._thread)
    time.sleep(0.5)
    assert _thread_cpu_ticks(aengine._thread) - before <= 2  # clock ticks are 10 ms


def test_waiting_counts_queued_requests(aengine):
    async def main():
        tasks = [asyncio.ensure_future(collect(aengine, "Paris", SamplingParams(temperature=0, max_tokens=40)))
                 for _ in range(7)]
        await asyncio.sleep(0)  # every add is queued
        peak = aengine.num_waiting()
        while not all(t.done() for t in tasks):
            peak = max(peak, aengine.num_waiting())
            await asyncio.sleep(0.005)
        return peak, [t.result() for t in tasks]

    peak, results = asyncio.run(main())
    assert peak >= 3  # 7 requests, max_num_seqs=4
    assert aengine.num_waiting() == 0 and all(r[-1].finished for r in results)


def test_shutdown_drains_then_refuses(llm, offline):
    aengine = AsyncEngine(llm.engine).start()
    prompts = mixed_prompts(3)

    async def main():
        tasks = [asyncio.ensure_future(collect(aengine, p, GREEDY)) for p in prompts]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(aengine.shutdown, True)
        with pytest.raises(EngineClosedError):
            await aengine.add_request("Paris", GREEDY)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert not aengine.is_running and not aengine._thread.is_alive()
    for deltas, ref in zip(results, offline):
        assert deltas[-1].finish_reason == "length" and "".join(d.text for d in deltas) == ref.text


def test_group_with_a_prompt_per_request(aengine, offline, llm):
    """Batched prompts: entry i of the group reads prompts[i] (strings or token ids), on one stream."""
    prompts = mixed_prompts(3)
    ids = llm.tokenizer.encode(prompts[1])
    group = [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]

    async def main():
        stream = await aengine.add_request([prompts[0], ids, prompts[2]], group, request_id="b")
        return [d async for d in stream]

    deltas = asyncio.run(main())
    texts = ["".join(d.text for d in deltas if d.index == i) for i in range(3)]
    assert texts[:2] == [offline[0].text, offline[1].text]
    assert [t for d in deltas if d.index == 2 for t in d.token_ids] == offline[2].token_ids[:4]
    assert [d.num_prompt_tokens for d in deltas if d.finished and d.index == 1] == [len(ids)]

    async def refused():
        with pytest.raises(ValueError, match="2 prompts for a group of 3"):
            await aengine.add_request(prompts[:2], group)
        with pytest.raises(ValueError, match="empty"):  # one bad prompt refuses the whole group
            await aengine.add_request([prompts[0], ""], group[:2])

    asyncio.run(refused())
    wait_until(lambda: not aengine.engine.has_unfinished() and aengine.num_waiting() == 0)
    wait_until(lambda: aengine.snapshot.num_free_blocks == aengine.snapshot.num_blocks)

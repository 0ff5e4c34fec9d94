"""AsyncEngine: LLMEngine.step() on a background thread, for the server.

LLMEngine is not thread-safe, so the event loop never touches it. Adds and aborts are
queued as commands that the engine thread applies between steps; what a step adds to a
request goes back to the coroutine that waits on it with loop.call_soon_threadsafe into that
request's asyncio.Queue. With nothing to do the thread sleeps on a condition variable, so an
idle server costs no CPU, and a step blocks only this thread, never the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tetrispec.engine.llm_engine import LLMEngine
from tetrispec.engine.logprobs import TokenLogprob
from tetrispec.engine.sequence import Sequence
from tetrispec.sampling_params import SamplingParams
from tetrispec.spec.stats import SpecStats

logger = logging.getLogger(__name__)


class EngineClosedError(RuntimeError):
    """The engine is shutting down (or its thread died) and takes no new requests."""


@dataclass
class RequestDelta:
    """What one engine step added to one request. Text, token ids and logprobs are new since the
    last delta, so a stream is the concatenation of its deltas; counts are cumulative."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # stop | length | abort | error
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float  # every time here is time.monotonic()
    first_token_time: float | None
    time: float  # when the step that produced this delta ended
    prev_time: float | None  # the previous delta's time; None on the first (inter-token latency)
    stats: SpecStats | None = None  # a copy of the request's SpecStats, on the final delta
    error: str | None = None  # set when finish_reason is "error"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs is set
    index: int = 0  # the request's place in its group (add_request with a list of params)

    @property
    def spec(self) -> dict | None:
        """The request's speculation statistics (SpecStats.summary()), on the final delta."""
        return None if self.stats is None else self.stats.summary()


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine counters, copied on the engine thread after each step so that readers on other
    threads (/metrics) never see the engine half-way through one."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 1
    num_free_blocks: int = 1
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    spec: SpecStats = field(default_factory=SpecStats)
    selector: str = "none"
    calibration: dict | None = None  # acceptance-estimator reliability (--tetris-capacity auto)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


@dataclass(eq=False)
class _Request:
    """Engine-thread bookkeeping for one request: where its deltas go and how much was sent."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future  # resolves to the prompt's token count, or to add_request's error
    index: int = 0
    seq: Sequence | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    last_time: float | None = None


class RequestStream:
    """Async iterator over the deltas of one request, or of a group of them (interleaved as the
    steps produce them; delta.index says whose). It ends when every request finished. Leaving
    it early (break, an exception, a cancelled task, `abort()`) aborts the requests still
    running so their KV blocks are freed at once."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue, num_prompt_tokens: int,
                 request_ids: list[str] | None = None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.request_ids = request_ids or [request_id]
        self.num_prompt_tokens = num_prompt_tokens  # the first entry's (each delta carries its own request's)
        self._running = set(range(len(self.request_ids)))  # indexes not yet finished
        self._queue = queue

    @property
    def finished(self) -> bool:
        return not self._running

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        try:
            delta = await self._queue.get()
        except BaseException:  # cancelled: the caller is gone
            self.abort()
            raise
        if delta.finished:
            self._running.discard(delta.index)
        return delta

    def abort(self) -> None:
        for i in sorted(self._running):
            self.engine.abort(self.request_ids[i])
        self._running.clear()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


def _group_prompts(prompt: str | list[int] | list[str | list[int]], size: int) -> list[str | list[int]]:
    """One prompt per entry of a group: `prompt` itself for each, or a list of prompts (a token-id
    list holds ints, a list of prompts does not) with exactly one per entry."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return [prompt] * size
    if len(prompt) != size:
        raise ValueError(f"got {len(prompt)} prompts for a group of {size} requests")
    return list(prompt)


def _copy_stats(stats: SpecStats) -> SpecStats:
    """A copy the event loop may read while the engine thread goes on."""
    out = SpecStats()
    out.merge(stats)
    return out


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable, *args: object) -> None:
    """Run fn(*args) on the request's event loop; a loop that has closed has no one to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _resolve(fut: asyncio.Future, value: object = None, error: BaseException | None = None) -> None:
    if fut.done():  # the caller was cancelled while waiting
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[tuple[str, object]] = []  # ("add", _Request) | ("abort", request_id)
        self._num_pending = 0  # adds queued but not yet applied: they count as waiting
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._listeners: list[Callable[[RequestDelta], None]] = []
        self._snapshot = self._take_snapshot()
        self._closed = False  # no new requests
        self._stopping = False  # the thread exits once nothing is left (or at once without drain)
        self._drain = True
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tetrispec-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the ones in flight first; join the thread."""
        with self._cond:
            self._closed = self._stopping = True
            self._drain = self._drain and drain
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests (any thread; add_request from a coroutine) ---------------------------------
    async def add_request(self, prompt: str | list[int] | list[str | list[int]],
                          params: SamplingParams | list[SamplingParams],
                          request_id: str | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        A list of params is a group (OpenAI's `n`, and batched prompts): one engine request per
        entry, ids `<request_id>-<i>`, all on one stream; the engine takes them in one go, and
        refuses or accepts them together. The entries share `prompt`, or with a list of prompts
        (strings or token-id lists, one per entry) entry i reads prompts[i]. Raises ValueError for
        input the engine rejects (empty prompt, too long, bad token ids) and EngineClosedError
        while shutting down.
        """
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        group = params if isinstance(params, list) else [params]
        ids = [request_id] if not isinstance(params, list) else [f"{request_id}-{i}" for i in range(len(group))]
        prompts = _group_prompts(prompt, len(group)) if isinstance(params, list) else [prompt]
        queue: asyncio.Queue = asyncio.Queue()
        reqs = [_Request(rid, pr, p, loop, queue, loop.create_future(), index=i)
                for i, (rid, pr, p) in enumerate(zip(ids, prompts, group))]
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shutting down")
            self._commands.extend(("add", req) for req in reqs)
            self._num_pending += len(reqs)
            self._cond.notify()
        try:
            results = await asyncio.gather(*(req.added for req in reqs), return_exceptions=True)
        except asyncio.CancelledError:
            for rid in ids:
                self.abort(rid)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid in ids:  # the ones that were added
                self.abort(rid)
            raise errors[0]
        return RequestStream(self, request_id, queue, results[0], ids)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def add_listener(self, fn: Callable[[RequestDelta], None]) -> None:
        """fn(delta) runs on the engine thread for every delta (metrics); keep it cheap."""
        self._listeners.append(fn)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def num_waiting(self) -> int:
        """Requests not yet running: queued adds plus the scheduler's waiting queue."""
        with self._cond:
            return self._num_pending + self._snapshot.num_waiting

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                    if self._stopping and not self._drain:
                        commands += [("abort", rid) for rid in self._requests]
                self._apply(commands)
                if self.engine.has_unfinished():
                    self._step()
                elif self._stopping:
                    with self._cond:
                        if not self._commands:
                            break
        except BaseException:
            logger.exception("engine thread died")
        finally:
            self._close_all()

    def _apply(self, commands: list[tuple[str, object]]) -> None:
        if not commands:
            return
        num_adds = 0
        for kind, arg in commands:
            if kind == "add":
                num_adds += 1
                self._add(arg)
            else:
                self._abort(arg)
        with self._cond:  # one critical section: a request is pending or waiting, never neither
            self._num_pending -= num_adds
            self._snapshot = self._take_snapshot()

    def _add(self, req: _Request) -> None:
        try:
            if req.request_id in self._requests:
                raise ValueError(f"request id {req.request_id!r} is already running")
            req.seq = self.engine.add_request(req.prompt, req.params, req.request_id)
        except Exception as e:  # ValueError: bad input, answered as such; anything else too
            _deliver(req.loop, _resolve, req.added, None, e)
            return
        self._requests[req.request_id] = req
        _deliver(req.loop, _resolve, req.added, req.seq.num_prompt_tokens)

    def _abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self.engine.abort_request(request_id)
            self._emit(req, time.monotonic(), reason="abort")

    def _step(self) -> None:
        try:
            seqs = self.engine.step()
        except Exception as e:
            # The batch's state is unknown: end every running request with an error and go on
            # serving; waiting requests were not part of the step and stay queued.
            logger.exception("engine step failed")
            error = f"engine step failed: {type(e).__name__}: {e}"
            for seq in list(self.engine.scheduler.running):
                self.engine.abort_request(seq.request_id)
                if seq.request_id in self._requests:
                    self._emit(self._requests[seq.request_id], time.monotonic(), reason="error", error=error)
            seqs = []
        now = time.monotonic()
        for seq in seqs:
            if seq.request_id in self._requests:
                self._emit(self._requests[seq.request_id], now)
        with self._cond:
            self._snapshot = self._take_snapshot()
            if not seqs and not self._commands:  # nothing could be scheduled: do not spin
                self._cond.wait(0.01)

    def _emit(self, req: _Request, now: float, reason: str | None = None, error: str | None = None) -> None:
        """Send req what is new since its last delta; `reason` ends it (abort, error)."""
        seq = req.seq
        finished = seq.is_finished or reason is not None
        text = seq.output_text
        end = len(text)
        if not finished and seq.params.stop:
            # A stop string may still complete in the next step and cut the text back to
            # where it starts: hold back what could be its prefix.
            end -= max(len(s) for s in seq.params.stop) - 1
        delta = RequestDelta(
            request_id=req.request_id,
            text=text[req.sent_chars : end] if end > req.sent_chars else "",
            token_ids=seq.output_token_ids[req.sent_tokens :],
            finished=finished,
            finish_reason=(reason or seq.finish_reason) if finished else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            time=now,
            prev_time=req.last_time,
            stats=_copy_stats(seq.spec) if finished else None,
            error=error,
            logprobs=seq.logprobs[req.sent_tokens :] if seq.params.logprobs is not None else None,
            index=req.index,
        )
        req.sent_chars, req.sent_tokens, req.last_time = max(req.sent_chars, end), seq.num_output_tokens, now
        if finished:
            del self._requests[req.request_id]
        _deliver(req.loop, req.queue.put_nowait, delta)
        for fn in self._listeners:
            try:
                fn(delta)
            except Exception:
                logger.exception("delta listener failed")

    def _close_all(self) -> None:
        """The thread is leaving: refuse new work, and end everything still queued or running."""
        with self._cond:
            self._closed = True
            commands, self._commands = self._commands, []
            self._num_pending = 0
        for kind, arg in commands:
            if kind == "add":
                _deliver(arg.loop, _resolve, arg.added, None, EngineClosedError("the engine stopped"))
        for req in list(self._requests.values()):
            try:
                self.engine.abort_request(req.request_id)
            except Exception:
                pass
            self._emit(req, time.monotonic(), reason="error", error="the engine stopped")

    def _take_snapshot(self) -> EngineSnapshot:
        e = self.engine
        spec = SpecStats()
        spec.merge(e.stats)
        return EngineSnapshot(
            num_running=len(e.scheduler.running),
            num_waiting=len(e.scheduler.waiting),
            num_blocks=e.block_manager.num_blocks,
            num_free_blocks=e.block_manager.num_free,
            num_prompt_tokens=e.num_prompt_tokens,
            num_generation_tokens=e.num_generation_tokens,
            num_preemptions=e.scheduler.num_preemptions,
            spec=spec,
            selector=e.selector.name if e.draft is not None else "none",
            calibration=e.selector.calibration() if hasattr(e.selector, "calibration") else None,
        )

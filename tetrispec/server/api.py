"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics over one AsyncEngine.

Every error is OpenAI's body, {"error": {"message", "type", "param", "code"}}, so OpenAI
clients raise their usual exceptions: bad input (FastAPI's validation errors included) is a
400 that touches no other request, a wrong key a 401, a full waiting queue a 503. Handlers
only queue work; the engine thread does it, and a client that goes away aborts its request.
A request for n choices of P prompts is P * n engine requests on one stream (AsyncEngine.add_request
with a list of params), choice i of prompt p at index p * n + i: they batch like any others, and
end together on an abort or an error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tetrispec.engine.async_engine import AsyncEngine, EngineClosedError, RequestDelta, RequestStream
from tetrispec.engine.logprobs import TokenLogprob
from tetrispec.sampling_params import SEED_RANGE, SamplingParams
from tetrispec.server.logprobs import LogprobFormatter
from tetrispec.server.metrics import ServerMetrics
from tetrispec.server.protocol import (
    MAX_N,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
)
from tetrispec.spec.stats import SpecStats

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               405: "invalid_request_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as 'field: what is wrong' and the top-level field name."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":  # loc is the character where parsing stopped
        reason = (err.get("ctx") or {}).get("error") or err.get("msg")
        return f"request body is not valid JSON: {reason} at character {loc[0] if loc else 0}", None
    if not loc:  # the body as a whole: empty, not an object, or not sent as JSON (curl -d without -H)
        return ("request body must be a JSON object sent with 'Content-Type: application/json'"
                if err.get("type") != "missing" else "request body is empty: send a JSON object"), None
    where = ".".join(loc)
    msg = str(err.get("msg"))
    if err.get("type") == "value_error":  # our own validators' messages name the field already
        return msg.removeprefix("Value error, "), loc[0]
    return (f"{where}: {msg}" if where else msg), loc[0]


def _body_error(exc: StarletteHTTPException) -> str:
    """FastAPI answers a body json.loads raised on (other than a JSONDecodeError) with a bare 'There
    was an error parsing the body': say why, from the exception it chained."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8: {cause.reason} at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "request body is not valid JSON: nested too deeply"
    if isinstance(cause, ValueError):  # e.g. an integer of more than 4300 digits
        return f"request body is not valid JSON: {str(cause).split(';')[0]}"
    return str(exc.detail)


class BearerAuth:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>`; /health and /metrics do not,
    so probes and scrapers need no secret."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


MAX_REQUEST_BYTES = 32 * 2**20  # default body limit: 100 prompts of 8k tokens as id lists are ~5 MB


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is a 413 before anything parses it. FastAPI reads
    a whole body into memory (and its JSON into objects several times larger), so one oversized
    request could take the memory every other request's KV cache lives beside. A declared
    Content-Length is checked up front (the HTTP server stops a body at it); a body without one
    (chunked) is read here, counted, and handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body is larger than {self.max_bytes} bytes (the server's "
                                       "--max-request-bytes)", code="request_too_large")
        await response(scope, receive, send)


def _param_of(error: ValueError, fields: tuple[str, ...]) -> str | None:
    """SamplingParams' messages start with the field name ('top_p must be in (0, 1]')."""
    first = str(error).split(" ", 1)[0]
    return first if first in fields else None


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of n choices. With a seed, choice i samples with seed + i (wrapped into the seed
    range): a seeded request stays reproducible, yet its choices are not copies of one sample."""
    if params.seed is None:
        return [params] * n
    span = SEED_RANGE[1] - SEED_RANGE[0] + 1
    return [replace(params, seed=(params.seed + i - SEED_RANGE[0]) % span + SEED_RANGE[0]) for i in range(n)]


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_waiting_requests: int | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """An app over a started AsyncEngine. The caller owns the engine's lifecycle (start, then
    shutdown after the server stopped), so several apps may share one engine."""
    engine = async_engine.engine
    tokenizer = engine.tokenizer
    formatter = LogprobFormatter(tokenizer)
    metrics = ServerMetrics(async_engine, served_model_name)
    app = FastAPI(title="tetrispec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics

    # ---- errors and auth ------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = _body_error(exc) if exc.status_code == 400 else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes or MAX_REQUEST_BYTES)  # outermost: added last

    # ---- plain routes ---------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: busybox `wget --spider` health checks
    async def health() -> Response:
        return Response(status_code=200 if async_engine.is_running else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(id=served_model_name, root=str(engine.config.model or served_model_name),
                         max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        """OpenAI's retrieve-model route (`client.models.retrieve`)."""
        if model_id != served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {served_model_name!r}",
                           "model", "model_not_found")
        return ModelCard(id=served_model_name, root=str(engine.config.model or served_model_name),
                         max_model_len=engine.max_model_len).model_dump()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- generation -------------------------------------------------------------------------
    def sampling_params(body: SamplingRequest, max_tokens: int | None, max_tokens_param: str) -> SamplingParams:
        if body.model is not None and body.model != served_model_name:
            raise APIError(400, f"model {body.model!r} does not exist; this server serves {served_model_name!r}",
                           "model", "model_not_found")
        if body.n is not None and not 1 <= body.n <= MAX_N:
            raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {body.n}", "n")
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server", name)
        try:
            return body.sampling_params(max_tokens)
        except ValueError as e:
            param = _param_of(e, tuple(type(body).model_fields))
            raise APIError(400, str(e), max_tokens_param if param == "max_tokens" else param) from None

    def check_fits(num_prompt_tokens: int, max_tokens: int | None, max_tokens_param: str) -> None:
        """Refuse a request whose prompt plus max_tokens exceeds the context, as OpenAI and vLLM do,
        instead of silently cutting the completion short at the limit. A prompt that alone is too
        long is left to the engine, which names the prompt."""
        limit = engine.max_model_len
        if max_tokens is not None and num_prompt_tokens < limit < num_prompt_tokens + max_tokens:
            raise APIError(400, f"this model's context is {limit} tokens, but the request asks for "
                           f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, {max_tokens} "
                           f"to generate): lower {max_tokens_param} or the prompt", max_tokens_param)

    async def submit(prompts: list[list[int]], body: SamplingRequest, max_tokens: int | None, prompt_param: str,
                     request_id: str, max_tokens_param: str = "max_tokens") -> RequestStream:
        """Queue n choices of every prompt (token ids), choice i of prompt p at index p * n + i."""
        params = sampling_params(body, max_tokens, max_tokens_param)
        for prompt in prompts:
            check_fits(len(prompt), max_tokens, max_tokens_param)
        n = body.n or 1
        waiting = async_engine.num_waiting()  # an empty queue takes any request, however many choices it has
        if max_waiting_requests is not None and waiting and waiting + len(prompts) * n > max_waiting_requests:
            raise APIError(503, f"the server is busy: {waiting} requests are waiting and at most "
                           f"{max_waiting_requests} may; retry later", code="queue_full")
        if len(prompts) == 1:  # one prompt: one request, or a group sharing it
            prompt, group = prompts[0], params if n == 1 else choice_params(params, n)
        else:  # each prompt's choices sample as that prompt's own request would (seed + i for choice i)
            prompt = [p for p in prompts for _ in range(n)]
            group = choice_params(params, n) * len(prompts)
        try:
            return await async_engine.add_request(prompt, group, request_id)
        except ValueError as e:  # the engine checks what needs the model: prompt ids, logit_bias / stop ids
            param = _param_of(e, ("logit_bias", "stop_token_ids")) or prompt_param
            raise APIError(400, str(e), param) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), code="shutting_down") from None

    async def encode(texts: list, param: str, **kw) -> list[list[int]]:
        """Texts to token ids (token-id lists pass as they are), as the engine would, on a worker thread:
        an 8 MB prompt takes 6 s to encode, and on the event loop every stream would wait that long. The
        tokenizer's ValueError (a lone surrogate: valid JSON, not Unicode) is a 400, not a 500."""
        try:
            return await asyncio.to_thread(lambda: [tokenizer.encode(t, **kw) if isinstance(t, str) else t
                                                    for t in texts])
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = body.prompts()
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise APIError(400, "prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty", "prompt")
        ids = await encode(prompts, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await submit(ids, body, body.max_tokens, "prompt", request_id)
        n = body.n or 1
        created = int(time.time())
        offsets = [0] * len(stream.request_ids)  # text_offset of each choice's next token

        def choice(index: int, text: str, logprobs: list[TokenLogprob] | None,
                   finish_reason: str | None = None) -> CompletionChoice:
            formatted = None
            if logprobs is not None:
                formatted = formatter.completion(logprobs, offsets[index])
                offsets[index] += sum(len(t) for t in formatted.tokens)
            return CompletionChoice(index=index, text=text, logprobs=formatted, finish_reason=finish_reason)

        def chunk(choices: list[CompletionChoice], spec: dict | None = None, usage: UsageInfo | None = None) -> str:
            return CompletionChunk(id=request_id, created=created, model=served_model_name, choices=choices,
                                   usage=usage, spec_stats=spec).model_dump_json(exclude_none=True)

        if body.stream:
            return _stream(stream, body.include_usage, choice, chunk, n)
        choices = await _collect(request, stream)
        return JSONResponse(CompletionResponse(
            id=request_id, created=created, model=served_model_name,
            choices=[choice(i, c.text, c.logprobs, c.last.finish_reason) for i, c in enumerate(choices)],
            usage=_usage(choices, n), spec_stats=_spec(choices),
        ).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        if not body.messages:
            raise APIError(400, "messages is empty", "messages")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(p.type != "text" for p in content):
                    raise APIError(400, "only text content parts are supported", "messages")
                if any(p.text is None for p in content):
                    raise APIError(400, f"messages.{i}.content: a text part needs its 'text'", "messages")
                content = "".join(p.text for p in content)
            messages.append({"role": m.role, "content": content})
        try:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"chat template failed: {e}", "messages") from None
        ids = (await encode([rendered], "messages", add_special_tokens=False))[0]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        newer = body.max_completion_tokens is not None
        max_tokens = body.max_completion_tokens if newer else body.max_tokens
        stream = await submit([ids], body, max_tokens, "messages", request_id,
                              "max_completion_tokens" if newer else "max_tokens")
        created = int(time.time())
        n = body.n or 1

        def stream_choice(index: int, text: str, logprobs: list[TokenLogprob] | None,
                          finish_reason: str | None = None, role: str | None = None) -> ChatStreamChoice:
            return ChatStreamChoice(index=index, delta=DeltaMessage(role=role, content=text),
                                    logprobs=None if logprobs is None else formatter.chat(logprobs),
                                    finish_reason=finish_reason)

        def chunk(choices: list[ChatStreamChoice], spec: dict | None = None, usage: UsageInfo | None = None) -> str:
            return ChatCompletionChunk(id=request_id, created=created, model=served_model_name, choices=choices,
                                       usage=usage, spec_stats=spec).model_dump_json(exclude_none=True)

        if body.stream:
            first = [chunk([stream_choice(i, "", None, role="assistant")]) for i in range(len(stream.request_ids))]
            return _stream(stream, body.include_usage, stream_choice, chunk, n, first)
        choices = await _collect(request, stream)
        return JSONResponse(ChatCompletionResponse(
            id=request_id, created=created, model=served_model_name,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=c.text),
                                logprobs=None if c.logprobs is None else formatter.chat(c.logprobs),
                                finish_reason=c.last.finish_reason) for i, c in enumerate(choices)],
            usage=_usage(choices, n), spec_stats=_spec(choices),
        ).model_dump())

    return app


@dataclass
class _Choice:
    """One choice's whole output, gathered from its deltas."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    last: RequestDelta | None = None  # its final delta

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _usage(choices: list[_Choice], n: int) -> UsageInfo:
    """Each prompt counted once (its n choices, p * n to p * n + n - 1, read the same one), completion
    tokens summed over every choice, as OpenAI."""
    prompt = sum(c.last.num_prompt_tokens for c in choices[::n])
    completion = sum(c.last.num_output_tokens for c in choices)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _spec(choices: list[_Choice]) -> dict:
    """The request's spec_stats: its choices' speculation statistics summed."""
    total = SpecStats()
    for c in choices:
        if c.last.stats is not None:
            total.merge(c.last.stats)
    return total.summary()


def _stream_error(delta: RequestDelta) -> str:
    error = ErrorInfo(message=delta.error or "request failed", type="server_error", code="engine_error")
    return json.dumps(ErrorResponse(error=error).model_dump())


def _stream(stream: RequestStream, include_usage: bool, choice: Callable[..., object], chunk: Callable[..., str],
            n: int, first: list[str] | None = None) -> StreamingResponse:
    """Server-sent events: a chunk per choice and step with new text or logprobs (choices
    interleave, each chunk naming its index), the finish reason and that choice's spec_stats on
    its last one; once every choice finished, usage (when asked for) and `data: [DONE]`.
    Starlette cancels the generator when the client disconnects; leaving it aborts every choice."""

    async def events() -> AsyncIterator[str]:
        async with stream:
            for line in first or []:
                yield _sse(line)
            finals: dict[int, _Choice] = {}
            async for delta in stream:
                if delta.error is not None:
                    yield _sse(_stream_error(delta))
                    break
                if delta.finished:
                    finals[delta.index] = _Choice(last=delta)
                    yield _sse(chunk([choice(delta.index, delta.text, delta.logprobs, delta.finish_reason)],
                                     spec=delta.spec))
                elif delta.text or delta.logprobs:
                    yield _sse(chunk([choice(delta.index, delta.text, delta.logprobs)]))
            else:
                if include_usage:
                    done = [finals[i] for i in sorted(finals)]
                    yield _sse(chunk([], spec=_spec(done), usage=_usage(done, n)))
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, stream: RequestStream) -> list[_Choice]:
    """Every choice of a non-streamed request, whole, aborting them all if the client leaves first
    or one of them fails."""

    async def consume() -> list[_Choice]:
        choices = [_Choice() for _ in stream.request_ids]
        async for delta in stream:
            if delta.error is not None:
                raise APIError(500, delta.error, code="engine_error")
            c = choices[delta.index]
            c.parts.append(delta.text)
            if delta.logprobs is not None:
                c.logprobs = c.logprobs or []
                c.logprobs.extend(delta.logprobs)
            c.last = delta
        return choices

    async with stream:
        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        return work.result()

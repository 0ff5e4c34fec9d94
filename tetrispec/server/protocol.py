"""OpenAI request and response bodies (the subset tetrispec serves), as pydantic models.

Requests are strict, so a string where a number belongs is a 400 rather than a silent
coercion, and ignore fields they do not know, as OpenAI-compatible servers commonly do (clients
send `user`, `logprobs: null` and the like). Value ranges are SamplingParams' job: one
validator for the offline API and the server. Extensions over OpenAI's fields: top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, min_tokens and include_stop_str_in_output in requests
(vLLM's names), spec_stats in responses.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tetrispec.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # choices per request: each is an engine request of its own
# Stop strings per request (OpenAI allows 4): every step looks for each in the new text, so a
# request with 300,000 of them slowed every running request's steps 30-fold.
MAX_STOP = 64
# OpenAI's message roles, and Llama 3.1's `ipython` (tool output in its template); the chat template
# would render any string, so a typo would pass unseen.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- requests ---------------------------------------------------------------------------
class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""

    model: str | None = None
    n: int | None = 1  # choices (1..MAX_N), each an engine request of its own
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None  # vLLM's extension; default 0
    include_stop_str_in_output: bool = False  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None  # completions: alternatives per token (an int); chat: on or off
    presence_penalty: float | None = None  # OpenAI's default: 0
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension; default 1 (off)
    min_p: float | None = None  # vLLM's extension; default 0 (off)
    logit_bias: Any = None  # OpenAI's: {"token id": bias in [-100, 100]}, keys are strings in JSON

    def unsupported(self) -> str | None:
        """The first field set to something tetrispec cannot do, or None."""
        return None

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: alternatives per token, None when off (each route spells it its way)."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """Raises ValueError naming the offending field first (e.g. 'top_p must be ...')."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop must be at most {MAX_STOP} strings, got {len(self.stop)}")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed, max_tokens=max_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=self.num_logprobs(),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0, logit_bias=_token_bias(self.logit_bias), min_tokens=self.min_tokens or 0,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    # One prompt, or a batch of them (OpenAI's): each prompt is a string or a list of token ids.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """Say what a prompt may be, rather than pydantic's complaint about the union's first member."""
        if isinstance(value, str) or _token_ids(value) or (
                isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(map(_token_ids, value)))):
            return value
        raise ValueError("prompt must be a string, a list of token ids, or a list of prompts (all strings or all "
                         "token-id lists)")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one, or the batch (an empty list reads as one empty prompt)."""
        batch = isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batch else [self.prompt]

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    def num_logprobs(self) -> int | None:
        """`logprobs: k` (0 included: the sampled tokens' own) turns them on; null and false leave them off."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        return self.logprobs


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class ContentPart(StrictModel):
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal[ROLES]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    top_logprobs: int | None = None  # alternatives per token, with logprobs: true
    # OpenAI features tetrispec lacks, typed loosely: any value but the "off" ones is refused.
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    def unsupported(self) -> str | None:
        """Clients send the "off" values (`tool_choice: "none"`, `response_format: {"type":
        "text"}`, empty lists) freely; anything asking for the feature would be silently ignored."""
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.function_call not in (None, "none", "auto"):
            return "function_call"
        return super().unsupported()

    def num_logprobs(self) -> int | None:
        """`logprobs: true` turns them on, with `top_logprobs` alternatives (default 0), as OpenAI."""
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be true or false here (top_logprobs sets how many alternatives), "
                             f"got {self.logprobs!r}")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0


# ---- responses --------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # per token: the most likely alternatives and the sampled token
    text_offset: list[int]  # where each token starts in the choice's text (as its tokens decode)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    spec_stats: dict | None = None  # extension: this request's speculation statistics


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely alternatives, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    spec_stats: dict | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    spec_stats: dict | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    spec_stats: dict | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tetrispec"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _token_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON strings) -> {token id: bias}; SamplingParams checks the values."""
    if not value:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias must be a map from token ids to numbers in [-100, 100], got {value!r}")
    try:  # digits only: int() also reads " 1 ", "1_0" and "١" (an Arabic-Indic one)
        if not all(k.isascii() and k.isdigit() for k in value):
            raise ValueError
        return {int(k): v for k, v in value.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"logit_bias keys must be token ids (integers), got {list(value)!r}") from None

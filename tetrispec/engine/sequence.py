"""A request's state while it moves through the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from tetrispec.engine.logprobs import TokenLogprob
from tetrispec.sampling_params import SamplingParams
from tetrispec.spec.stats import SpecStats


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # target KV entries that are valid (always num_tokens - 1 while running)
    num_draft_cached: int = 0  # draft KV entries that are valid (may lag behind)
    generator: torch.Generator | None = None  # per-request seed; None: the engine's generator
    finish_reason: str | None = None
    output_text: str = ""
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    stop_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) and stop_token_ids: what min_tokens holds back
    stop_text_from: int = 0  # with min_tokens, a stop string must end past this many characters of output text
    spec: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if params.logprobs is set
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def adjusts_logits(self) -> bool:
        """Whether this step samples from adjusted logits (so greedy is no longer the raw argmax, and the
        argmax-only fast path does not apply): penalties, a logit bias, or min_tokens not yet reached.
        Past min_tokens every row of a step, drafts included, is past it too."""
        return self.params.adjusts_logits or self.num_output_tokens < self.params.min_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

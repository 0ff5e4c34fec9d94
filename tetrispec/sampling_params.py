"""Per-request sampling parameters, validated at submission so bad input fails before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

# A torch.Generator takes seeds in [-2**63, 2**64): beyond that manual_seed overflows.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Sampling tensors are int64: a larger top_k overflows torch.tensor inside an engine step, which
# fails the whole batch. Any top_k >= the vocabulary already means "no top-k".
MAX_TOP_K = 2**63 - 1
# Below this, logits / temperature overflows float32 and the probabilities turn to NaN; such a
# temperature means "the most likely token" anyway, so it counts as greedy (as vLLM does).
MIN_SAMPLING_TEMPERATURE = 1e-5
# Most alternatives per token SamplingParams.logprobs may ask for (OpenAI's top_logprobs limit, vLLM's default).
MAX_LOGPROBS = 20
# OpenAI's range for presence_penalty and frequency_penalty.
PENALTY_RANGE = (-2.0, 2.0)
# OpenAI's range for a logit_bias value (-100 or 100: in effect bans or forces the token).
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's: EOS and stop_token_ids cannot be sampled, and stop strings do not match, before this
    # many output tokens (the tokens' probabilities are zeroed, not skipped after sampling).
    min_tokens: int = 0
    # vLLM's: keep the matched stop string (or stop token's text) at the end of the output text.
    include_stop_str_in_output: bool = False
    # Target log-probabilities of each emitted token plus this many most likely alternatives;
    # None: off (nothing computed, greedy batches keep their argmax-only fast path).
    logprobs: int | None = None
    # OpenAI's: subtracted from a token's logit once it appears in this request's output (presence)
    # and once per appearance (frequency); negative values encourage repetition.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's / Hugging Face's: logits of tokens in the prompt or the output so far are divided by it
    # when positive and multiplied when negative; > 1 discourages repetition, 1 is off.
    repetition_penalty: float = 1.0
    # vLLM's: after temperature, tokens less likely than min_p times the most likely one are dropped.
    min_p: float = 0.0
    # OpenAI's: token id -> value added to that token's logit before penalties and sampling.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            self.temperature = 0.0

    def validate(self) -> None:
        def bad(name: str, value: object, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {value!r}")

        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", self.temperature, "a number")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            raise bad("temperature", self.temperature, "in [0, 100]")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", self.top_k, "-1 (disabled), 0 (disabled) or a positive integer below 2**63")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise bad("seed", self.seed, "an integer in [-2**63, 2**64)")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", self.max_tokens, "a positive integer")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", self.include_stop_str_in_output, "a boolean")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        if not all(map(_is_token_id, self.stop_token_ids)):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value <= high:
                raise bad(name, value, f"a number in [{low:g}, {high:g}]")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", self.repetition_penalty, "a positive number (1 is off)")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "a number in [0, 1]")
        if self.logit_bias is not None and not (
            isinstance(self.logit_bias, dict)
            and all(map(_is_token_id, self.logit_bias))
            and all(_is_number(v) and LOGIT_BIAS_RANGE[0] <= v <= LOGIT_BIAS_RANGE[1] for v in self.logit_bias.values())
        ):
            raise bad("logit_bias", self.logit_bias, "a map from token ids to numbers in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether logits depend on the tokens seen so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias: the logits sampled from are not the model's (see
        Sequence.adjusts_logits, which adds min_tokens while it holds)."""
        return self.has_penalties or bool(self.logit_bias)


def _is_token_id(value: object) -> bool:
    """A non-negative int, not a bool (whether it is in the vocabulary is the engine's check)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    """A real number, not a bool and not NaN (NaN fails every range check silently otherwise)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

"""The engine's per-token logprobs (TokenLogprob) in OpenAI's two response shapes.

Each token is shown as its own decoded text (special tokens included), its bytes as that
text's UTF-8, as vLLM does; a token holding part of a multi-byte character decodes to U+FFFD.
"""

from __future__ import annotations

from functools import lru_cache

from tetrispec.engine.logprobs import TokenLogprob
from tetrispec.model.tokenizer import Tokenizer
from tetrispec.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -inf (a token a reduced head cannot emit); vLLM reports such values as -9999.0.
MIN_LOGPROB = -9999.0


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.text = lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text(token_id)
        return TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        """choices[].logprobs of /v1/chat/completions: the top_logprobs alternatives asked for."""
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._top(e.token_id, e.logprob).model_dump(),
                             top_logprobs=[self._top(t, lp) for t, lp in e.top])
            for e in entries])

    def completion(self, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """choices[].logprobs of /v1/completions. Each token's top_logprobs holds the `logprobs`
        alternatives plus the sampled token (OpenAI: "up to logprobs + 1 elements"); text_offset
        counts characters from `offset`, where the choice's previous tokens ended."""
        tokens, offsets = [], []
        for e in entries:
            offsets.append(offset)
            tokens.append(self.text(e.token_id))
            offset += len(tokens[-1])
        tops = []
        for e in entries:
            top = {self.text(t): max(lp, MIN_LOGPROB) for t, lp in e.top}
            top.setdefault(self.text(e.token_id), max(e.logprob, MIN_LOGPROB))
            tops.append(top)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[max(e.logprob, MIN_LOGPROB) for e in entries],
                                  top_logprobs=tops, text_offset=offsets)

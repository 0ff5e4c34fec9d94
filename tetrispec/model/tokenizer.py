"""Tokenizer and chat template, from a Hugging Face directory or from GGUF metadata.

Both sources end up as one `tokenizers.Tokenizer`, so encoding, decoding and the vocabulary
check between a draft and its target work the same whichever file the model came from.
BOS is added here (not by the tokenizer's post-processor) so that `add_bos_token` is the one
switch that decides it, for HF and GGUF alike.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 3, 4, 6

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF pre-tokenizer names whose llama.cpp regex is "digits one by one, then GPT-2's split"
DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
LLAMA3_PRES = {"llama-bpe", "llama3", "llama-v3"}


def gguf_metadata(reader: Any, key: str, default: Any = None) -> Any:
    """Value of one GGUF metadata field (str, number, bool or list), or default when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in LLAMA3_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gpt2_from_gguf(reader: Any, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in gguf_metadata(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(gguf_metadata(reader, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_from_gguf(reader: Any, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """SentencePiece ("llama") vocabulary as a byte-fallback BPE.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose merged piece has the
    highest score, which is BPE with merges ranked by the merged piece's score.
    """
    scores = gguf_metadata(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        if types[i] != TOKEN_NORMAL:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], a, b))
    ranked.sort()
    unk = tokens[gguf_metadata(reader, "tokenizer.ggml.unknown_token_id", 0)]
    merges = [(a, b) for *_, a, b in ranked]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gguf_metadata(reader, "tokenizer.ggml.add_space_prefix", True):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)
    return tok


def _token_content(tok: str | dict | None) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_list(x: int | list[int] | None) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the engine needs around it: BOS/EOS ids, the
    add-BOS rule and the chat template."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))  # dedup, keep order
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """An HF checkpoint directory or a .gguf file."""
        path = Path(path)
        if path.is_dir():
            return cls.from_hf_dir(path)
        return cls.from_gguf(gguf.GGUFReader(path))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (tetrispec needs a fast-tokenizer file)")
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 writes it apart
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
        bos_id = tok.token_to_id(bos) if bos else gen.get("bos_token_id")
        eos_ids = ([tok.token_to_id(eos)] if eos and tok.token_to_id(eos) is not None else [])
        eos_ids += _as_list(gen.get("eos_token_id"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no flag: do what the tokenizer.json post-processor does
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(tok, bos_id, eos_ids, bool(add_bos), template)

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Rebuild the tokenizer llama.cpp would use from tokenizer.ggml.* metadata."""
        kind = gguf_metadata(reader, "tokenizer.ggml.model")
        tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        types = gguf_metadata(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if kind == "gpt2":
            tok = _gpt2_from_gguf(reader, tokens)
        elif kind == "llama":
            tok = _spm_from_gguf(reader, tokens, types)
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2 BPE, llama SPM)")
        special = [tokens[i] for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in special])
        bos_id = gguf_metadata(reader, "tokenizer.ggml.bos_token_id")
        eos_ids = [gguf_metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        add_bos = gguf_metadata(reader, "tokenizer.ggml.add_bos_token", kind == "llama")
        template = gguf_metadata(reader, "tokenizer.chat_template")
        return cls(tok, bos_id, [e for e in eos_ids if e is not None], bool(add_bos), template)

    def save_hf(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json (eos ids)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        eos = self.eos_token_ids
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.tok.id_to_token(eos[0]) if eos else None,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        gen = {"bos_token_id": self.bos_token_id, "eos_token_id": eos}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

    # ---- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.tok.id_to_token(self.bos_token_id)

    def vocab(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in the text (e.g. from a chat template) become their ids."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render the model's own template (as transformers does); encode the result with
        add_special_tokens=False when the template already writes the BOS token."""
        if self.chat_template is None:
            raise ValueError("this model ships no chat template; send plain prompts (completions) instead")
        eos = self.tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=eos or "", **kwargs,
        )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Chat templates render in the sandboxed environment transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: (
        json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Streams the text of one sequence as tokens arrive.

    vLLM's scheme: decode only a short window ids[prefix_offset:] and emit what it adds past
    ids[prefix_offset:read_offset], so each step costs O(new tokens), not O(length). A window
    that ends in U+FFFD is an incomplete UTF-8 character (byte tokens): wait for more tokens.
    The window keeps one token of context so leading-space rules (SentencePiece) come out right.
    """

    def __init__(
        self, tokenizer: Tokenizer, num_prompt_tokens: int = 0, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(num_prompt_tokens - 5, 0)
        self.read_offset = num_prompt_tokens
        self.text = ""  # everything emitted so far

    def step(self, all_token_ids: list[int], final: bool = False) -> str:
        """all_token_ids: prompt + output so far. final: flush even an incomplete character."""
        decode = self.tokenizer.decode
        prefix = decode(all_token_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(all_token_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(all_token_ids)
        self.text += new
        return new

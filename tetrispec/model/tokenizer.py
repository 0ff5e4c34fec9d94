"""Tokenizer and chat template, from a Hugging Face directory or from GGUF metadata.

Both sources end up as one `tokenizers.Tokenizer`, so encoding, decoding and the vocabulary
check between a draft and its target work the same whichever file the model came from.
BOS is added here (not by the tokenizer's post-processor) so that `add_bos_token` is the one
switch that decides it, for HF and GGUF alike.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from tetrispec.model import chat_templates

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
    scores = gguf_metadata(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    return _spm_tokenizer(tokens, scores, types, gguf_metadata(reader, "tokenizer.ggml.unknown_token_id", 0),
                          gguf_metadata(reader, "tokenizer.ggml.add_space_prefix", True))


def _spm_tokenizer(tokens: list[str], scores: list[float], types: list[int], unk_id: int,
                   add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece ("llama") vocabulary as a byte-fallback BPE.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose merged piece has the
    highest score, which is BPE with merges ranked by the merged piece's score.
    """
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
    merges = [(a, b) for *_, a, b in ranked]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    _spm_text_rules(tok, add_space_prefix)
    return tok


def _spm_text_rules(tok: tokenizers.Tokenizer, add_space_prefix: bool) -> None:
    """Spaces as "▁" (one in front of the text when the model adds a dummy prefix), bytes back."""
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)


@dataclass
class SentencePieceModel:
    """What a SentencePiece `tokenizer.model` holds that the tokenizer needs (Llama 1/2, Vicuna,
    Mistral checkpoints often ship it without a tokenizer.json)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # SentencePiece's piece types, the same numbers as llama.cpp's token types
    model_type: int  # 1 unigram, 2 BPE
    unk_id: int
    bos_id: int
    eos_id: int
    add_dummy_prefix: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _proto_fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: ints for varints, bytes for
    length-delimited fields, raw bytes for fixed 32/64-bit ones. Enough for sentencepiece_model.proto
    without the sentencepiece or protobuf packages."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos: pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos: pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """Parse a SentencePiece ModelProto: pieces (1), trainer spec (2), normalizer spec (3)."""
    pieces, scores, types = [], [], []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    try:
        for field, value in _proto_fields(Path(path).read_bytes()):
            if field == 1:
                piece = dict(_proto_fields(value))
                pieces.append(piece.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                types.append(piece.get(3, TOKEN_NORMAL))
            elif field == 2:
                trainer = dict(_proto_fields(value))
            elif field == 3:
                normalizer = dict(_proto_fields(value))
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
    signed = lambda v, default: default if v is None else (v - (1 << 64) if v >= 1 << 63 else v)  # noqa: E731
    return SentencePieceModel(pieces, scores, types, model_type=trainer.get(3, 1),
                              unk_id=signed(trainer.get(40), 0), bos_id=signed(trainer.get(41), 1),
                              eos_id=signed(trainer.get(42), 2), add_dummy_prefix=bool(normalizer.get(3, 1)))


def _from_sentencepiece(spm: SentencePieceModel, cfg: dict) -> tokenizers.Tokenizer:
    """The fast tokenizer transformers would convert a SentencePiece model into, with the
    tokens tokenizer_config.json adds after the model's vocabulary."""
    if spm.model_type == 2:  # BPE: Llama 1/2, Vicuna, Mistral
        tok = _spm_tokenizer(spm.pieces, spm.scores, spm.types, spm.unk_id, spm.add_dummy_prefix)
    elif spm.model_type == 1:  # unigram
        tok = tokenizers.Tokenizer(models.Unigram(list(zip(spm.pieces, spm.scores)), spm.unk_id, byte_fallback=True))
        _spm_text_rules(tok, spm.add_dummy_prefix)
    else:
        raise ValueError(f"unsupported SentencePiece model type {spm.model_type} (supported: BPE, unigram)")
    if cfg.get("legacy") is False and spm.add_dummy_prefix:
        # transformers' non-legacy Llama tokenizer: the dummy prefix goes in front of the text only,
        # not in front of each piece of it between special tokens
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    special = [p for p, t in zip(spm.pieces, spm.types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False) for p in special])
    added = sorted((int(i), t) for i, t in (cfg.get("added_tokens_decoder") or {}).items())
    for i, t in added:
        content = _token_content(t)
        if tok.token_to_id(content) is not None:
            continue
        if i != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"tokenizer_config.json adds {content!r} as id {i}, but the next free id is "
                             f"{tok.get_vocab_size(with_added_tokens=True)}")
        tok.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
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
        cfg = _read_json(path / "tokenizer_config.json")
        spm = None
        if (path / "tokenizer.json").is_file():
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "tokenizer.model").is_file():
            spm = read_sentencepiece(path / "tokenizer.model")
            tok = _from_sentencepiece(spm, cfg)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
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
        if spm is not None:  # the model file names them too (LlamaTokenizer's defaults)
            bos_id = spm.bos_id if bos_id is None and spm.bos_id >= 0 else bos_id
            eos_ids = eos_ids or ([spm.eos_id] if spm.eos_id >= 0 else [])
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and spm is not None:  # LlamaTokenizer adds BOS unless told not to
            add_bos = bos_id is not None
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
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            # encode_batch lets other threads run while it works (encode holds the GIL): the server
            # encodes on a worker thread, and a megabyte prompt must not stall the engine's steps
            ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:  # what tokenizers raises for a lone surrogate: valid JSON, not Unicode
            raise ValueError("the text is not valid Unicode (it holds a lone surrogate code point)") from None
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
        return chat_templates.render(
            self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=eos or "", **kwargs,
        )


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

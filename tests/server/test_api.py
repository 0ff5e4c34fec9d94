"""The OpenAI-compatible server, driven by the real `openai` client over loopback.

One in-process server (default model, no speculation) serves most tests; a `tetrispec serve`
subprocess over the tiny target/draft pair covers speculation, the CLI flags, the bounded
queue and a clean SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tetrispec import LLM, SamplingParams
from tetrispec.engine.async_engine import AsyncEngine
from tetrispec.server.api import build_app, choice_params

NAME = "smollm2-test"
MAX_TOKENS = 8
LOGPROBS = 3
SUBJECTS = ["France", "Japan", "the ocean", "a cat", "Python", "music", "the moon", "winter"]
STEMS = ["Tell me about {}.", "Write one sentence about {}:", "Q: What do you know about {}?\nA:",
         "Here is a fact about {}:"]
PROMPTS = [stem.format(s) for stem in STEMS for s in SUBJECTS]  # 32 distinct prompts
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
REPEATING = ["1, 2, 3, 4, 5,", "a a a a a a a a"]  # prompts whose greedy outputs each penalty changes
PENALTIES = [dict(presence_penalty=1.5), dict(frequency_penalty=1.5), dict(repetition_penalty=1.3)]
MIN_P = dict(temperature=1.0, seed=5, min_p=0.3)
MIN_TOKENS = dict(min_tokens=MAX_TOKENS, stop=[" "])  # no stop string matches before the last token
REQUIRED_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens",
    "vllm:generation_tokens", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos",
    "tetrispec:spec_verified_tokens", "tetrispec:spec_drafted_tokens", "tetrispec:spec_accepted_tokens",
    "tetrispec:spec_request_steps", "tetrispec:spec_verification_success_rate", "tetrispec:spec_selector_info",
]


class LiveServer:
    """uvicorn on a thread, listening on a socket bound before it starts (no port race)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(spec_method="none", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def refs(llm) -> dict:
    """Offline greedy outputs, computed before the engine is handed to the server thread."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with_logprobs = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS)
    logprobs = llm.generate(PROMPTS[0], with_logprobs, use_tqdm=False)[0].logprobs
    ban = {logprobs[0].token_id: -100.0}  # the greedy output's first token
    return {"ban": ban,
            "banned": llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias=ban),
                                   use_tqdm=False)[0].text,
            "completions": [o.text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)],
            "chat": llm.chat(CHAT, greedy, use_tqdm=False)[0].text,
            "logprobs": logprobs,
            "penalized": [[o.text for o in llm.generate(REPEATING, SamplingParams(temperature=0, max_tokens=12, **kw),
                                                        use_tqdm=False)] for kw in [{}] + PENALTIES],
            "min_p": llm.generate(PROMPTS[2], SamplingParams(max_tokens=MAX_TOKENS, **MIN_P), use_tqdm=False)[0].text,
            "sampled": llm.generate(PROMPTS[2], SamplingParams(max_tokens=MAX_TOKENS, seed=5), use_tqdm=False)[0].text,
            "chat_logprobs": llm.chat(CHAT, with_logprobs, use_tqdm=False)[0].logprobs,
            "held": llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                            **MIN_TOKENS), use_tqdm=False)[0].text}


@pytest.fixture(scope="module")
def server(llm, refs):
    aengine = AsyncEngine(llm.engine).start()
    live = LiveServer(build_app(aengine, NAME))
    live.aengine, live.engine = aengine, llm.engine
    yield live
    live.stop()
    aengine.shutdown(drain=False, timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed like `name{label="v",...}` (labels sorted, model_name dropped)."""
    out = {}
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def blocks_free(server) -> bool:
    snap = server.aengine.snapshot
    return snap.num_running == 0 and snap.num_free_blocks == snap.num_blocks


# ---- plain routes ---------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.head(f"{server.url}/health").status_code == 200  # was 405
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


# ---- generation -----------------------------------------------------------------------------
def test_completion(client, refs):
    resp = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].text == refs["completions"][0]
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= MAX_TOKENS
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model_extra["spec_stats"]["verified_tokens"] == 0  # extension field; no draft here


def test_chat(client, refs):
    resp = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == refs["chat"]
    assert resp.usage.completion_tokens <= MAX_TOKENS and "spec_stats" in resp.model_extra
    tool_turn = [*CHAT, {"role": "assistant", "content": "x"}, {"role": "ipython", "content": "42"}]
    assert client.chat.completions.create(model=NAME, messages=tool_turn, max_tokens=2).choices  # Llama 3.1's role


def test_streaming_completion_and_chat(client, refs):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == refs["completions"][1]
    assert len([c for c in chunks if c.choices]) > 1, "text must arrive in several chunks"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["spec_stats"]["request_steps"] >= 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= MAX_TOKENS

    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == refs["chat"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] is not None


def test_32_concurrent_requests_match_offline(server, refs):
    running = []
    server.aengine.add_listener(lambda d: running.append(len(server.engine.scheduler.running)))
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        args = dict(model=NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0)
        if i % 2:
            return "".join([c.choices[0].text async for c in await aclient.completions.create(**args, stream=True)])
        return (await aclient.completions.create(**args)).choices[0].text

    async def main():
        async with aclient:
            return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    texts = asyncio.run(main())
    assert texts == refs["completions"]
    assert max(running) > 8, "concurrent requests must share engine steps"


# ---- logprobs -------------------------------------------------------------------------------
def token_text(llm, token_id: int) -> str:
    return llm.tokenizer.decode([token_id], skip_special_tokens=False)


def test_completion_logprobs(client, llm, refs):
    """The engine's (target) logprobs in OpenAI's completions shape, streamed or not."""
    ref = refs["logprobs"]
    resp = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                     logprobs=LOGPROBS)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == refs["completions"][0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    assert lp.tokens == [token_text(llm, e.token_id) for e in ref]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref], abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top, entry in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref):
        # the LOGPROBS most likely tokens (the sampled one among them: greedy) and their target logprobs
        assert top == pytest.approx({token_text(llm, t): v for t, v in entry.top}, abs=1e-3)
        assert len(top) == LOGPROBS and top[token] == logprob == max(top.values())
    assert "".join(lp.tokens) == resp.choices[0].text

    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=LOGPROBS, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(streamed) > 1, "logprobs must arrive with their tokens, chunk by chunk"
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset  # offsets run on across chunks
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-3)

    sampled = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, logprobs=0, seed=3)
    lp = sampled.choices[0].logprobs  # logprobs=0: just the sampled token
    assert all(top == {t: v} for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert all(v <= 0 for v in lp.token_logprobs) and len(lp.tokens) == sampled.usage.completion_tokens


def test_chat_logprobs(client, llm, refs):
    ref = refs["chat_logprobs"]
    resp = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == len(ref)
    for item, entry in zip(content, ref):
        assert item.token == token_text(llm, entry.token_id) and item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(entry.logprob, abs=1e-3)
        assert [t.token for t in item.top_logprobs] == [token_text(llm, t) for t, _ in entry.top[:2]]
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob  # greedy

    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-3)
    assert all(i.top_logprobs == [] for i in streamed)  # top_logprobs defaults to 0

    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


# ---- n choices -------------------------------------------------------------------------------
def test_n_choices(client, refs):
    args = dict(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=1.0, seed=11, logprobs=0)
    resp = client.completions.create(n=4, **args)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert len(set(texts)) > 1, "seeded choices must be samples of their own, not copies"
    one = client.completions.create(**args)
    assert resp.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert resp.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in resp.choices)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert [c.text for c in client.completions.create(n=4, **args).choices] == texts  # reproducible
    # choice i samples as a single request seeded seed + i
    assert [client.completions.create(**{**args, "seed": 11 + i}).choices[0].text for i in (0, 2)] == texts[::2]

    greedy = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.text for c in greedy.choices] == [refs["completions"][0]] * 2

    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, n=3, seed=5,
                                          logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) > 1
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    one = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1)
    assert chat.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in chat.choices)


def test_n_choices_streamed(client):
    args = dict(model=NAME, prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=1.0, seed=21)
    whole = client.completions.create(n=3, **args)
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **args))
    texts, finished = ["", "", ""], []
    for c in chunks[:-1]:
        assert len(c.choices) == 1 and c.usage is None
        texts[c.choices[0].index] += c.choices[0].text
        if c.choices[0].finish_reason:
            finished.append(c.choices[0].index)
    assert sorted(finished) == [0, 1, 2]  # one final chunk per choice
    assert texts == [c.text for c in whole.choices]
    indexes = [c.choices[0].index for c in chunks[:-1]]
    assert any(a != b for a, b in zip(indexes, indexes[1:])) and indexes != sorted(indexes), "choices interleave"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    chat = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, n=2, stream=True,
                                               temperature=0))
    assert sorted(c.choices[0].index for c in chat if c.choices[0].delta.role == "assistant") == [0, 1]
    contents = ["", ""]
    for c in chat:
        contents[c.choices[0].index] += c.choices[0].delta.content or ""
    assert contents[0] == contents[1] and sum(bool(c.choices[0].finish_reason) for c in chat) == 2


def test_batched_prompts(client, refs):
    """A list of prompts: choice p * n + i is choice i of prompt p, as that prompt's own request would give."""
    batch = client.completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == refs["completions"][:3]
    singles = [client.completions.create(model=NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
               for p in PROMPTS[:3]]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in singles)  # each prompt once
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens

    args = dict(model=NAME, max_tokens=MAX_TOKENS, temperature=1.0, seed=7, n=2)
    sampled = client.completions.create(prompt=PROMPTS[2:4], **args)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    per_prompt = [client.completions.create(prompt=p, **args) for p in PROMPTS[2:4]]
    assert [c.text for c in sampled.choices] == [c.text for r in per_prompt for c in r.choices]
    assert sampled.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in per_prompt)
    assert sampled.usage.completion_tokens == sum(r.usage.completion_tokens for r in per_prompt)


def test_batched_token_id_prompts_streamed(client, llm, refs):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    args = dict(model=NAME, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0, n=2)
    whole = client.completions.create(**args)
    expected = [t for t in refs["completions"][:3] for _ in range(2)]  # greedy choices of one prompt agree
    assert [c.text for c in whole.choices] == expected
    assert whole.usage.prompt_tokens == sum(map(len, prompts))
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    texts = [""] * 6
    for c in chunks[:-1]:
        assert len(c.choices) == 1
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == expected
    indexes = [c.choices[0].index for c in chunks[:-1]]
    assert indexes != sorted(indexes), "the prompts' chunks interleave"
    assert sum(bool(c.choices[0].finish_reason) for c in chunks[:-1]) == 6
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_penalties_and_min_p(client, refs):
    """OpenAI's penalties as fields, vLLM's repetition_penalty and min_p as extra fields: the server
    samples as the offline API does with the same SamplingParams."""
    unpenalized, *penalized = refs["penalized"]
    for kw, ref in zip(PENALTIES, penalized):
        extra = {"extra_body": kw} if "repetition_penalty" in kw else kw
        resp = client.completions.create(model=NAME, prompt=REPEATING, max_tokens=12, temperature=0, **extra)
        assert [c.text for c in resp.choices] == ref != unpenalized, kw
    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          presence_penalty=-1, frequency_penalty=2,
                                          extra_body={"repetition_penalty": 2})
    assert chat.choices[0].message.content != refs["chat"]  # the chat route takes them too
    args = {k: v for k, v in MIN_P.items() if k != "min_p"}
    resp = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                     extra_body={"min_p": MIN_P["min_p"]}, **args)
    assert resp.choices[0].text == refs["min_p"] != refs["sampled"]


def test_logit_bias(client, refs):
    """OpenAI's logit_bias (token ids as strings): banning the greedy output's first token changes the
    output exactly as the offline API does."""
    bias = {str(t): v for t, v in refs["ban"].items()}
    for route in ("completions", "chat"):
        if route == "completions":
            text = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                             logit_bias=bias).choices[0].text
            assert text == refs["banned"] != refs["completions"][0]
        else:
            chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                  logit_bias={str(t): 100 for t in refs["ban"]})
            assert chat.choices[0].message.content != refs["chat"]


def test_min_tokens_and_include_stop_str_in_output(client, refs):
    """vLLM's stop-rule fields as extra fields, sampled as the offline API does."""
    args = dict(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    held = client.completions.create(**args, extra_body={"ignore_eos": True, **MIN_TOKENS}).choices[0].text
    assert held == refs["held"] and " " in held[:-1]
    cut = client.completions.create(**args, stop=[" "], extra_body={"ignore_eos": True}).choices[0]
    kept = client.completions.create(**args, stop=[" "], extra_body={"ignore_eos": True,
                                                                      "include_stop_str_in_output": True}).choices[0]
    assert kept.text == cut.text + " " and kept.finish_reason == cut.finish_reason == "stop"


def test_choice_seeds_stay_in_range():
    top = SamplingParams(seed=2**64 - 1)
    assert [p.seed for p in choice_params(top, 3)] == [2**64 - 1, -(2**63), -(2**63) + 1]
    assert [p.seed for p in choice_params(SamplingParams(seed=-5), 2)] == [-5, -4]
    assert choice_params(SamplingParams(), 2) == [SamplingParams()] * 2


# ---- bad input ------------------------------------------------------------------------------
BAD = [
    ("completions", '{"prompt": "x", "max_tokens": ', None),  # malformed JSON
    ("completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("completions", {"max_tokens": 4}, "prompt"),
    ("completions", ["not", "an", "object"], None),
    ("completions", {"prompt": "x", "model": "gpt-4"}, "model"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "n": 129}, "n"),
    ("completions", {"prompt": "x", "n": "2"}, "n"),
    ("chat/completions", {"messages": CHAT, "n": -1}, "n"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": "hello " * 2100}, "prompt"),
    ("completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("completions", {"prompt": ["a", ""]}, "prompt"),  # an empty prompt in a batch
    ("completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("completions", {"prompt": ["a", [1, 2]]}, "prompt"),  # mixed kinds
    ("completions", {"prompt": [[1, 2], "a"]}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": ["a", "hello " * 2100]}, "prompt"),  # one prompt of the batch too long
    ("completions", {"prompt": [[1, 2], [1] * 2000], "max_tokens": 100}, "max_tokens"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),  # not one of OpenAI's
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    # lone surrogates: valid JSON escapes no tokenizer encodes (were a 500)
    ("completions", '{"prompt": "a\\ud800"}', "prompt"),
    ("completions", '{"prompt": ["a", "\\udfff"]}', "prompt"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages"),
    ("completions", {"prompt": "x", "stop": ["s"] * 65}, "stop"),  # every step looks for each: 300,000 slowed all
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": 3}, "logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"prompt": "x", "echo": True}, "echo"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "frequency_penalty": 2.5}, "frequency_penalty"),
    ("completions", {"prompt": "x", "presence_penalty": -3}, "presence_penalty"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"prompt": "x", "repetition_penalty": "high"}, "repetition_penalty"),
    ("chat/completions", {"messages": CHAT, "min_p": 1.5}, "min_p"),
    ("completions", {"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ("chat/completions", {"messages": CHAT, "min_tokens": "2"}, "min_tokens"),
    ("chat/completions", {"messages": CHAT, "include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 2100}]}, "messages"),
    # values torch cannot hold: top_k used to fail the whole engine step (a 500 for every running request)
    ("completions", {"prompt": "x", "top_k": 10**30}, "top_k"),
    ("completions", {"prompt": "x", "seed": 2**70}, "seed"),
    # prompt + max_tokens beyond the context: refused (OpenAI, vLLM), not cut short at the limit
    ("completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("completions", {"prompt": [1] * 2000, "max_tokens": 100}, "max_tokens"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 2048}, "max_completion_tokens"),
    # OpenAI features tetrispec lacks (refused, not silently ignored)
    ("completions", {"prompt": "x", "logit_bias": {"50": -101}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"fifty": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": [50]}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"1_0": 1}}, "logit_bias"),  # int() read these as ids 10 and 1
    ("completions", {"prompt": "x", "logit_bias": {" 1 ": 1}}, "logit_bias"),
    ("chat/completions", {"messages": CHAT, "logit_bias": {"999999999": 1}}, "logit_bias"),  # past the vocabulary
    ("completions", {"prompt": "x", "stop_token_ids": [999999999]}, "stop_token_ids"),  # could never stop it
    ("completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
]


def test_bad_input_is_400_and_others_go_on(server, client, refs):
    good = {}

    def run_good():  # a streaming request that runs through all the bad ones
        stream = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        good["text"] = "".join(c.choices[0].text for c in stream if c.choices)

    thread = threading.Thread(target=run_good)
    thread.start()
    for route, body, param in BAD:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
            else {"json": body}
        resp = httpx.post(f"{server.url}/v1/{route}", timeout=60, **kwargs)
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["message"] and error["param"] == param, (body, error)
    thread.join(60)
    assert good["text"] == refs["completions"][3]
    with pytest.raises(openai.BadRequestError) as e:  # what an OpenAI client sees
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.status_code == 400 and e.value.body["code"] == "model_not_found"
    wait_until(lambda: blocks_free(server))


def test_off_values_of_unsupported_features_pass(client):
    """What clients send when a feature is off must not be refused."""
    resp = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=2, logprobs=False, tool_choice="none", response_format={"type": "text"},
        logit_bias={}, presence_penalty=0, extra_body={"tools": [], "top_logprobs": 0})
    assert resp.usage.completion_tokens >= 1
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2, logprobs=None, suffix=None, best_of=1,
                                     echo=False).usage.completion_tokens >= 1


def test_max_tokens_up_to_the_context_passes(server):
    body = {"model": NAME, "prompt": [28] * 2040, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["total_tokens"] == 2048


@pytest.mark.parametrize("content, headers, message", [
    ('{"prompt": "x"}', {"content-type": "application/x-www-form-urlencoded"}, "Content-Type: application/json"),
    ("", {"content-type": "application/json"}, "request body is empty"),
    ("5", {"content-type": "application/json"}, "must be a JSON object"),
    ('{"prompt": "x",}', {"content-type": "application/json"}, "Expecting property name enclosed in double quotes at"),
    # json.loads failures other than a JSONDecodeError were all 'There was an error parsing the body'
    (b'{"prompt": "\xff"}', {"content-type": "application/json"}, "not valid UTF-8"),
    ("[" * 100000, {"content-type": "application/json"}, "nested too deeply"),
    ('{"n": 1' + "0" * 5000 + "}", {"content-type": "application/json"}, "4300 digits"),
])
def test_body_that_is_not_a_json_object_says_so(server, content, headers, message):
    resp = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=60)
    assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text


def test_tiny_temperature_and_top_p_sample_the_top_token(client, refs):
    """temperature 1e-40 overflowed logits / T to NaN and top_p 1e-300 (0 in float32) masked every
    token: both sampled garbage instead of (nearly) greedy."""
    for kwargs in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-300}):
        resp = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, **kwargs)
        assert resp.choices[0].text == refs["completions"][0], kwargs


def test_retrieve_model(client):
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


# ---- disconnects ----------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_blocks(server):
    before = metrics(server.url).get('vllm:request_success_total{finished_reason="abort"}', 0.0)
    body = {"model": NAME, "prompt": PROMPTS[4], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_until(lambda: server.aengine.snapshot.num_free_blocks < server.aengine.snapshot.num_blocks)
    # the response is closed here, long before 1500 tokens
    wait_until(lambda: blocks_free(server))
    assert server.engine.block_manager.num_free == server.engine.block_manager.num_blocks
    assert metrics(server.url)['vllm:request_success_total{finished_reason="abort"}'] == before + 1


def test_disconnect_while_waiting_for_a_full_response(server):
    body = {"model": NAME, "prompt": PROMPTS[5], "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: blocks_free(server))
    assert server.engine.block_manager.num_free == server.engine.block_manager.num_blocks


def test_disconnect_aborts_every_choice(server):
    before = metrics(server.url).get('vllm:request_success_total{finished_reason="abort"}', 0.0)
    body = {"model": NAME, "prompt": PROMPTS[7], "max_tokens": 1500, "ignore_eos": True, "stream": True, "n": 3}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_until(lambda: server.aengine.snapshot.num_running == 3)
    wait_until(lambda: blocks_free(server))
    assert metrics(server.url)['vllm:request_success_total{finished_reason="abort"}'] == before + 3


def test_engine_error_fails_every_choice(server):
    engine, real_step, calls = server.engine, server.engine.step, []

    def failing_step():
        if engine.scheduler.running and not calls:
            calls.append(1)
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = failing_step
    try:
        resp = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": NAME, "prompt": PROMPTS[6], "max_tokens": 50, "n": 2})
    finally:
        del engine.step
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "engine_error"
    assert "injected fault" in resp.json()["error"]["message"]
    wait_until(lambda: blocks_free(server))


# ---- metrics ----------------------------------------------------------------------------------
def test_metrics_parse_and_move(server, client):
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert not [name for name in REQUIRED_METRICS if name not in families]
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert families["vllm:prompt_tokens"].type == "counter"
    before = metrics(server.url)
    resp = client.completions.create(model=NAME, prompt=PROMPTS[6], max_tokens=5, temperature=0, stream=True,
                                     stream_options={"include_usage": True})
    usage = [c for c in resp][-1].usage
    after = metrics(server.url)

    def moved(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert moved("vllm:prompt_tokens_total") == usage.prompt_tokens
    assert moved("vllm:generation_tokens_total") == usage.completion_tokens
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:inter_token_latency_seconds_count") == usage.completion_tokens - 1
    assert moved("tetrispec:decode_request_steps_total") == usage.completion_tokens - 1
    assert after['tetrispec:spec_selector_info{selector="none"}'] == 1
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0


def test_a_request_that_would_overfill_the_queue_is_503(server, monkeypatch):
    """--max-waiting-requests bounds queued sequences: a request's prompts x n count, and an empty
    queue takes any request (one too large for the bound would otherwise never be served)."""
    live = LiveServer(build_app(server.aengine, NAME, max_waiting_requests=2))
    try:
        def post(n: int) -> httpx.Response:
            return httpx.post(f"{live.url}/v1/completions", json={"prompt": ["x", "y"], "n": n, "max_tokens": 1},
                              timeout=60)

        monkeypatch.setattr(server.aengine, "num_waiting", lambda: 1)
        full = post(1)  # 1 waiting + 2 prompts > 2
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        monkeypatch.setattr(server.aengine, "num_waiting", lambda: 0)
        assert len(post(3).json()["choices"]) == 6
    finally:
        live.stop()
    wait_until(lambda: blocks_free(server))


def test_a_body_over_the_limit_is_413_and_others_go_on(server, client, refs):
    """--max-request-bytes: a declared Content-Length over it is refused before the body is read, a
    chunked body (no length) once it has grown past it; requests within it are served as usual."""
    live = LiveServer(build_app(server.aengine, NAME, max_request_bytes=1000))
    try:
        url, json_type = f"{live.url}/v1/completions", {"content-type": "application/json"}
        big = json.dumps({"prompt": "x" * 2000, "max_tokens": 1}).encode()
        pieces = [big[i : i + 300] for i in range(0, len(big), 300)]
        for response in (httpx.post(url, content=big, headers=json_type, timeout=60),
                         httpx.post(url, content=iter(pieces), headers=json_type, timeout=60)):  # chunked
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large"
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        small = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
        chunked = httpx.post(url, content=iter([json.dumps(small).encode()]), headers=json_type, timeout=60)
        assert chunked.status_code == 200 and chunked.json()["choices"][0]["text"] == refs["completions"][0]
    finally:
        live.stop()
    assert client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
                                     ).choices[0].text == refs["completions"][0]


# ---- api key ------------------------------------------------------------------------------------
def test_api_key(server):
    live = LiveServer(build_app(server.aengine, NAME, api_key="sekret"))
    try:
        wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        bare = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x"})
        assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}
        right = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sekret", max_retries=0)
        assert right.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{live.url}/health").status_code == 200  # probes need no key
    finally:
        live.stop()


# ---- `tetrispec serve`: speculation, bounded queue, SIGTERM ----------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_speculates_bounds_queue_and_drains_on_sigterm(tiny_pair):
    target, draft = tiny_pair
    port = free_port()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    cmd = [sys.executable, "-c", "import sys; from tetrispec.cli import main; sys.exit(main())", "serve",
           "--model", target, "--speculative-model", draft,
           "--port", str(port), "--max-num-seqs", "1", "--max-waiting-requests", "1", "--api-key", "k",
           "--num-kv-blocks", "256", "--max-model-len", "512", "--served-model-name", "tiny",
           "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

        first_chunk, results = threading.Event(), {}

        def long_stream():  # A: runs while everything below happens
            body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 400, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=120) as resp:
                lines = []
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()
            results["a"] = lines

        def queued():  # B: waits behind A (max_num_seqs=1)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
            results["b"] = client.completions.create(model="tiny", prompt="Paris", max_tokens=4, temperature=0)

        a = threading.Thread(target=long_stream)
        a.start()
        assert first_chunk.wait(60)
        b = threading.Thread(target=queued)
        b.start()
        wait_until(lambda: metrics(url).get("vllm:num_requests_waiting") == 1)
        full = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=auth)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
        wait_until(lambda: metrics(url).get("tetrispec:spec_verified_tokens_total", 0) > 0)
        m = metrics(url)
        assert m['tetrispec:spec_selector_info{selector="tetris"}'] == 1
        assert m["vllm:spec_decode_num_drafts_total"] > 0 and m["vllm:num_requests_running"] == 1
        assert "a" not in results, "A finished before SIGTERM: make it longer"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
        a.join(30)
        b.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = results["a"]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])
    assert final["usage"]["completion_tokens"] == 400 and final["spec_stats"]["verified_tokens"] > 0
    assert results["b"].choices[0].finish_reason == "length"

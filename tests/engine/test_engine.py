"""Engine core: batching with preemption is token-identical to one-at-a-time generation."""

from __future__ import annotations

import pytest
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PRESSURE = dict(max_num_seqs=8, num_kv_blocks=70, block_size=4, max_model_len=256, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def solo_outputs(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none", max_num_seqs=1)
    return [o.token_ids for o in llm.generate(mixed_prompts(32), GREEDY)]


def test_batched_with_preemption_matches_one_at_a_time(tiny_pair, solo_outputs):
    llm = LLM(tiny_pair[0], spec_method="none", **PRESSURE)
    outputs = llm.generate(mixed_prompts(32), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0, "the test must exercise preemption"
    assert [o.token_ids for o in outputs] == solo_outputs
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outputs)
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_outputs_in_input_order_with_text(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none", max_num_seqs=4)
    prompts = mixed_prompts(6)
    outputs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outputs] == prompts
    for o in outputs:
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.metrics["num_output_tokens"] == 24 and o.metrics["ttft"] is not None


def test_token_id_prompts_and_chat(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none")
    ids = llm.tokenizer.encode("The capital of France is")
    by_ids = llm.generate([ids], GREEDY)[0]
    by_text = llm.generate(["The capital of France is"], GREEDY)[0]
    assert by_ids.token_ids == by_text.token_ids
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    assert chat.prompt.endswith("<|im_start|>assistant\n") and len(chat.token_ids) == 24


def test_seeded_sampling_independent_of_batch(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none", max_num_seqs=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Paris"], seeded)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(["One, two", "Paris", "def add"], [others, seeded, others])
    assert batch[1].token_ids == alone
    again = llm.generate(["Paris"], seeded)[0].token_ids
    assert again == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(["Paris"], other_seed)[0].token_ids != alone


def test_stop_rules(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none")
    free = llm.generate(["One, two, three,"], GREEDY)[0]
    # stop token id: generation ends at its first occurrence, and it is kept in token_ids
    tok = free.token_ids[5]
    out = llm.generate(["One, two, three,"], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok]))[0]
    first = free.token_ids.index(tok)
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    # stop string: text is cut before it
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate(["One, two, three,"], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    # max_tokens
    out = llm.generate(["One, two, three,"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_eos_stops_unless_ignored(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none")
    llm.engine.eos_ids = {llm.generate(["Paris"], GREEDY)[0].token_ids[2]}  # pretend that token is EOS
    out = llm.generate(["Paris"], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 3
    out = llm.generate(["Paris"], GREEDY)[0]
    assert len(out.token_ids) == 24


def test_bad_requests_fail_before_work(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none", max_model_len=64, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], GREEDY)
    with pytest.raises(ValueError, match="context limit"):
        llm.generate(["Paris " * 100], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["Paris", "One", ""], GREEDY)  # the valid ones before it must not linger
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_bad_engine_config(tiny_pair):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(tiny_pair[0], max_model_len=512, max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(tiny_pair[0], not_an_option=1)
    with pytest.raises(ValueError, match="spec method"):
        LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="magic")
    with pytest.raises(ValueError, match="needs a draft"):
        LLM(tiny_pair[0], speculative_model=None, spec_method="tetris")


def test_engines_sharing_weights_keep_their_own_state(tiny_pair, solo_outputs):
    """Benchmarks run methods side by side on one copy of the weights: the weights are shared,
    caches and selectors are not, and a draft-less engine can still share a draft owner's target."""
    from tetrispec.engine.llm_engine import LLMEngine
    from tetrispec.llm import build_config

    owner = LLMEngine(build_config(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", max_num_seqs=4))
    plain = LLMEngine(build_config(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="none"),
                      weights_from=owner)
    fixed = LLMEngine(build_config(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="fixed", max_num_seqs=4),
                      weights_from=owner)
    assert plain.target.model is owner.target.model and plain.draft is None
    assert fixed.draft.model is owner.draft.model and fixed.target.kv_caches is not owner.target.kv_caches
    prompts = mixed_prompts(8)
    seqs = {name: [e.add_request(p, GREEDY) for p in prompts] for name, e in
            (("owner", owner), ("plain", plain), ("fixed", fixed))}
    while any(e.has_unfinished() for e in (owner, plain, fixed)):
        for e in (owner, plain, fixed):  # stepped alternately, as the lockstep benchmark does
            if e.has_unfinished():
                e.step()
    for name, ss in seqs.items():
        assert [s.output_token_ids for s in ss] == solo_outputs[:8], name
    assert fixed.stats.verified > 0 and plain.stats.verified == 0

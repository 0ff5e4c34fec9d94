"""min_tokens and include_stop_str_in_output (vLLM's stop-rule options).

min_tokens zeroes the probability of EOS and the stop token ids until the output has that many
tokens, so it changes what is sampled, not just when a request stops. Under speculation a verify
row j follows j drafts, so the row's own output length decides whether it is held back: an engine
that used the request's length for every row would verify drafts against the wrong distribution,
and greedy outputs would differ from plain decoding's.
"""

from __future__ import annotations

import pytest
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams
from tetrispec.engine.sequence import Sequence

NUM_PROMPTS = 24
# a small cache: requests are preempted and recomputed as well
PRESSURE = dict(max_num_seqs=8, num_kv_blocks=72, block_size=4, max_model_len=256, max_num_batched_tokens=256)
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def unconstrained(tiny_pair) -> list[list[int]]:
    llm = LLM(tiny_pair[0], spec_method="none")
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                    ignore_eos=True))
    return [o.token_ids for o in outs]


def held_back_params(unconstrained: list[list[int]]) -> list[SamplingParams]:
    """Request i stops on the token its unconstrained greedy output has at position p = 1 + i % 6,
    with min_tokens past p: that token is held back there, and the output must take another path."""
    return [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[out[1 + i % 6]],
                           min_tokens=3 + i % 6) for i, out in enumerate(unconstrained)]


def test_stop_ids_are_held_back_until_min_tokens(tiny_pair, unconstrained):
    params = held_back_params(unconstrained)
    llm = LLM(tiny_pair[0], spec_method="none")
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), params)
    eos = set(llm.engine.eos_ids)
    for o, p in zip(outs, params):
        held = set(p.stop_token_ids) | eos
        assert len(o.token_ids) >= p.min_tokens
        assert not held & set(o.token_ids[: p.min_tokens - 1])  # the min_tokens-th token may stop it
    changed = sum(o.token_ids[: len(u)] != u[: len(o.token_ids)] for o, u in zip(outs, unconstrained))
    assert changed == NUM_PROMPTS, "every request's stop token must have been held back at least once"


@pytest.mark.parametrize(("method", "kw"), [("fixed", dict(num_speculative_tokens=k)) for k in (1, 3)]
                         + [("tetris", dict(num_speculative_tokens=2, tetris_extra_proposals=2))], ids=str)
def test_greedy_under_speculation_equals_plain_decoding(tiny_pair, unconstrained, method, kw):
    # the target as its own draft: every draft is accepted unless min_tokens changes the target's
    # distribution at that row, so rows past the first are verified and their positions matter
    params = held_back_params(unconstrained)
    plain = LLM(tiny_pair[0], spec_method="none").generate(mixed_prompts(NUM_PROMPTS), params)
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[0], spec_method=method, **PRESSURE, **kw)
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert [o.text for o in outs] == [o.text for o in plain]
    assert llm.engine.stats.accepted > 0.5 * llm.engine.stats.verified


def test_stop_strings_wait_for_min_tokens_also_within_one_speculative_step(tiny_pair, unconstrained):
    # a stop string that the early output contains: matched there without min_tokens, not before it
    # with min_tokens, even when the token that reaches min_tokens and the ones after it arrive in one step
    plain_llm = LLM(tiny_pair[0], spec_method="none")
    texts = [plain_llm.engine.tokenizer.decode(u) for u in unconstrained]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[t[2:4]],
                             min_tokens=4) for t in texts if len(t.strip()) >= 4]
    prompts = [p for p, t in zip(mixed_prompts(NUM_PROMPTS), texts) if len(t.strip()) >= 4]
    plain = plain_llm.generate(prompts, params)
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[0], spec_method="fixed", num_speculative_tokens=4,
              **PRESSURE)
    outs = llm.generate(prompts, params)
    assert [(o.text, o.token_ids[: len(p.token_ids)]) for o, p in zip(outs, plain)] == [
        (p.text, p.token_ids) for p in plain]
    assert any(len(p.token_ids) < MAX_TOKENS for p in plain), "some stop string must end a request"
    for o in plain:
        assert len(o.token_ids) >= 4


def test_min_tokens_adjusts_logits_only_until_it_is_reached():
    """Past min_tokens nothing is held back: the request goes back to the argmax-only fast path."""
    seq = Sequence("r", [1, 2], SamplingParams(temperature=0, min_tokens=2))
    assert seq.adjusts_logits
    seq.token_ids += [3]
    assert seq.adjusts_logits
    seq.token_ids += [4]
    assert not seq.adjusts_logits
    biased = Sequence("b", [1, 2, 3, 4], SamplingParams(min_tokens=1, logit_bias={5: 1.0}), token_ids=[1, 2, 3, 4, 5])
    assert biased.adjusts_logits  # the bias still applies


def test_include_stop_str_in_output(tiny_pair, unconstrained):
    llm = LLM(tiny_pair[0], spec_method="none")
    tok = llm.engine.tokenizer
    text = tok.decode(unconstrained[0])
    stop = text[3:6]
    base = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    cut, kept = llm.generate([mixed_prompts(1)[0]] * 2, [SamplingParams(stop=[stop], **base),
                                                          SamplingParams(stop=[stop], include_stop_str_in_output=True,
                                                                         **base)])
    assert kept.text == cut.text + stop and kept.finish_reason == cut.finish_reason == "stop"
    token = unconstrained[0][2]
    cut, kept = llm.generate([mixed_prompts(1)[0]] * 2, [SamplingParams(stop_token_ids=[token], **base),
                                                          SamplingParams(stop_token_ids=[token],
                                                                         include_stop_str_in_output=True, **base)])
    assert cut.token_ids == kept.token_ids and kept.token_ids[-1] == token
    assert kept.text == tok.decode(kept.token_ids) and cut.text == tok.decode(kept.token_ids[:-1])


@pytest.mark.parametrize(("kw", "match"), [(dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=True), "min_tokens"),
                                           (dict(min_tokens=5, max_tokens=4), "at most max_tokens"),
                                           (dict(include_stop_str_in_output=1), "include_stop_str_in_output")])
def test_bad_values_raise_with_the_name(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)

"""Penalties and min_p under speculation stay lossless.

A verify forward's row j of a request follows its output plus its first j drafts, so the counts
behind that row's penalties must include those drafts. These tests catch an engine that forgets
them: greedy outputs with penalties must equal plain decoding's token for token, and sampled
outputs must reproduce plain decoding's frequencies. Rows past the first are only used when drafts
are accepted, so besides the tiny pair's draft the tests use a closer one (the target with a
little weight noise) that the target accepts often.
"""

from __future__ import annotations

import collections

import pytest
from conftest import mixed_prompts, noisy_copy
from test_spec_engine import PRESSURE, chi2_pvalue

from tetrispec import LLM, SamplingParams
from tetrispec.model.loader import load_model, save_checkpoint
from tetrispec.model.tokenizer import Tokenizer

# (requests 7, 15, 23 and 31 sample: none of them may be the one without penalties)
PENALTIES = [dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3),
             dict(repetition_penalty=1.8), dict(logit_bias={5: 10.0, 7: -100.0}),
             dict(presence_penalty=1.0, frequency_penalty=-0.5), {}]
NUM_PROMPTS = 32


def mixed_params() -> list[SamplingParams]:
    """Greedy requests with several penalty mixes and none; every 8th request samples, so that some
    batches run the full-distribution rule (greedy rows one-hot) instead of the argmax one."""
    return [SamplingParams(temperature=1.0 if i % 8 == 7 else 0.0, seed=i, max_tokens=24, ignore_eos=True,
                           **PENALTIES[i % len(PENALTIES)]) for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def close_draft(tiny_pair, tmp_path_factory) -> str:
    model, _ = load_model(tiny_pair[0])
    path = tmp_path_factory.mktemp("close_draft") / "draft"
    save_checkpoint(noisy_copy(model, 0.1), Tokenizer.from_path(tiny_pair[0]), path)
    return str(path)


@pytest.fixture(scope="module")
def plain_greedy(tiny_pair) -> list[list[int]]:
    llm = LLM(tiny_pair[0], spec_method="none", max_num_seqs=1)
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), mixed_params())
    unpenalized = llm.generate(mixed_prompts(NUM_PROMPTS), SamplingParams(temperature=0, max_tokens=24,
                                                                          ignore_eos=True))
    changed = [i for i, (a, b) in enumerate(zip(outs, unpenalized)) if a.token_ids != b.token_ids]
    assert len(changed) >= 8 and all(PENALTIES[i % len(PENALTIES)] for i in changed), "penalties must bite"
    return [o.token_ids for o in outs]


METHODS = ([("fixed", dict(num_speculative_tokens=k)) for k in range(1, 5)]
           + [("tetris", dict(num_speculative_tokens=2, tetris_extra_proposals=1)),
              ("tetris", dict(num_speculative_tokens=3, tetris_extra_proposals=2))])


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=lambda x: str(x))
def test_greedy_with_penalties_identical_to_plain_decoding(tiny_pair, close_draft, plain_greedy, method, kw):
    llm = LLM(tiny_pair[0], speculative_model=close_draft, spec_method=method, **PRESSURE, **kw)
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), mixed_params())
    greedy = [i for i in range(NUM_PROMPTS) if i % 8 != 7]
    assert [outs[i].token_ids for i in greedy] == [plain_greedy[i] for i in greedy]
    assert llm.engine.scheduler.num_preemptions > 0, "the test must exercise preemption"
    s = llm.engine.stats
    assert s.accepted > 0.1 * s.verified, "rows past the first must be used often"
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_greedy_with_penalties_on_the_tiny_pair(tiny_pair, plain_greedy):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=3,
              **PRESSURE)
    outs = llm.generate(mixed_prompts(NUM_PROMPTS), mixed_params())
    assert [o.token_ids for i, o in enumerate(outs) if i % 8 != 7] == [
        t for i, t in enumerate(plain_greedy) if i % 8 != 7]


def test_draft_counts_its_own_drafts(tiny_pair):
    """With the target as its own draft, a draft that penalizes as the target does (its earlier drafts
    counted) proposes exactly the target's greedy tokens: every verified draft is accepted."""
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[0], spec_method="fixed", num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=1.0,
                            presence_penalty=0.5, repetition_penalty=1.5)
    llm.generate(mixed_prompts(8), params)
    s = llm.engine.stats
    assert s.verified > 0 and s.accepted == s.verified


SAMPLED = dict(temperature=1.0, max_tokens=3, ignore_eos=True, presence_penalty=1.5, frequency_penalty=2.0,
               repetition_penalty=1.5, min_p=0.02)


def _counts(llm: LLM, n: int, seed: int) -> tuple[collections.Counter, collections.Counter]:
    """Counts of whole outputs and of their last token (the one whose row follows the most drafts).

    The prompt is one the model likes to repeat tokens after: that is where the penalties of a row
    that forgot its drafts differ from plain decoding's (with them forgotten, one output in ten
    repeats a token here, against none in plain decoding)."""
    params = [SamplingParams(seed=seed + i, **SAMPLED) for i in range(n)]
    outs = llm.generate([" ".join(["Speculative decoding"] * 4)] * n, params)
    return collections.Counter(tuple(o.token_ids) for o in outs), collections.Counter(o.token_ids[-1] for o in outs)


def test_sampling_with_penalties_matches_plain_frequencies(tiny_pair, close_draft):
    n = 1000
    plain = LLM(tiny_pair[0], spec_method="none", max_num_seqs=64)
    spec = LLM(tiny_pair[0], speculative_model=close_draft, spec_method="fixed", num_speculative_tokens=2,
               max_num_seqs=64)
    seq_a, tok_a = _counts(plain, n, seed=0)
    seq_b, tok_b = _counts(spec, n, seed=10_000)
    s = spec.engine.stats
    assert s.accepted > 0.2 * s.verified and s.verified > s.accepted
    assert chi2_pvalue(tok_a, tok_b) > 1e-3
    assert chi2_pvalue(seq_a, seq_b) > 1e-3

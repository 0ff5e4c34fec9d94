"""Presence, frequency and repetition penalties equal a hand computation, count the drafts a row
follows, and leave requests without penalties (and the greedy fast path) alone."""

from __future__ import annotations

import pytest
import torch
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams
from tetrispec.engine.penalties import apply_penalties
from tetrispec.engine.sequence import Sequence

V = 8


def seq(prompt: list[int], output: list[int], **penalties) -> Sequence:
    s = Sequence("r", prompt, SamplingParams(**penalties))
    s.token_ids += output
    return s


def by_hand(logits: list[float], prompt: list[int], output: list[int], presence: float = 0.0,
            frequency: float = 0.0, repetition: float = 1.0) -> list[float]:
    """The documented rule, one token at a time: repetition first, then frequency and presence."""
    out = []
    for t, x in enumerate(logits):
        count = output.count(t)
        if t in prompt or count:
            x = x / repetition if x > 0 else x * repetition
        out.append(x - frequency * count - presence * (count > 0))
    return out


def test_penalized_logits_equal_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, V) * 3
    logits[:, 0] = float("-inf")  # a token a reduced head cannot emit stays out
    a = seq([1, 2, 2], [3, 3, 4, 1], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    b = seq([5], [6, 6], presence_penalty=-1.0, frequency_penalty=2.0)  # negative presence: encouraged
    c = seq([7], [7, 7], repetition_penalty=0.5)  # below 1: repetition encouraged
    plain = seq([1], [1, 1])
    rows = [a, a, b, plain, c]  # a owns two rows: a verify forward's row 0 and row 1 (after one draft)
    drafts = [[], [6], [5, 6], [1], []]
    before = logits.clone()
    out = apply_penalties(logits, rows, drafts)
    assert torch.equal(logits, before), "the raw logits are what logprobs report: left as they were"
    expected = [
        by_hand(logits[0].tolist(), [1, 2, 2], [3, 3, 4, 1], 0.5, 0.25, 1.5),
        by_hand(logits[1].tolist(), [1, 2, 2], [3, 3, 4, 1, 6], 0.5, 0.25, 1.5),
        by_hand(logits[2].tolist(), [5], [6, 6, 5, 6], -1.0, 2.0),
        logits[3].tolist(),  # no penalties: untouched, its drafts ignored
        by_hand(logits[4].tolist(), [7], [7, 7], repetition=0.5),
    ]
    assert out[:, 0].isneginf().all()
    assert torch.allclose(out[:, 1:], torch.tensor(expected)[:, 1:])


def test_logit_bias_is_added_before_the_penalties():
    torch.manual_seed(1)
    logits = torch.randn(3, V) * 3
    a = seq([1], [2, 2], logit_bias={2: 5.0, 3: -100.0}, repetition_penalty=2.0, frequency_penalty=0.5)
    b = seq([4], [4], logit_bias={0: 1.5})  # bias only: no counts needed
    plain = seq([1], [1])
    out = apply_penalties(logits, [a, b, plain])
    biased_a = logits[0].clone()
    biased_a[2] += 5.0
    biased_a[3] -= 100.0
    biased_b = logits[1].clone()
    biased_b[0] += 1.5
    expected = torch.stack([torch.tensor(by_hand(biased_a.tolist(), [1], [2, 2], frequency=0.5, repetition=2.0)),
                            biased_b, logits[2]])
    assert torch.allclose(out, expected)
    assert SamplingParams(logit_bias={1: 0.5}).adjusts_logits and not SamplingParams(logit_bias={}).adjusts_logits


def test_batches_without_penalties_return_their_logits_as_they_are():
    logits = torch.randn(2, V)
    assert apply_penalties(logits, [seq([1], [2]), seq([3], [])], [[4], []]) is logits


def test_penalties_change_greedy_output_and_skip_the_fast_path_only_when_set(tiny_pair, monkeypatch):
    """A greedy request with penalties no longer takes the raw argmax: its batch runs full logits.
    Batches without penalties keep the argmax-only path."""
    llm = LLM(tiny_pair[0], spec_method="none")
    forward, calls = llm.engine.target.forward, []
    monkeypatch.setattr(llm.engine.target, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = llm.generate(mixed_prompts(4), plain)
    assert calls == []
    penalized = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.0)
    outs = llm.generate(mixed_prompts(4), [plain, plain, penalized, penalized])  # 2 and 3 repeat tokens
    assert len(calls) == 16  # one full-logits forward per token of the mixed batch
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in base[:2]]
    for out, ref in zip(outs[2:], base[2:]):
        assert max(map(out.token_ids.count, out.token_ids)) < max(map(ref.token_ids.count, ref.token_ids)), \
            "the penalty should curb repetition"


@pytest.mark.parametrize("kw, match", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(presence_penalty=True), "presence_penalty"),
    (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"3": 1.0}), "logit_bias"),
    (dict(logit_bias={3: float("nan")}), "logit_bias"),
])
def test_out_of_range_values_raise_with_the_name(kw, match):
    with pytest.raises(ValueError, match=f"^{match} must be"):
        SamplingParams(**kw)
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.1, min_p=1).has_penalties
    assert not SamplingParams(min_p=0.5).has_penalties  # min_p does not depend on the history

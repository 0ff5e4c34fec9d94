"""Logprobs of emitted tokens are the target's raw log-softmax at the positions that emitted them,
whichever speculation method ran (verify forwards emit several tokens per step)."""

from __future__ import annotations

import pytest
import torch
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams
from tetrispec.engine.logprobs import token_logprobs
from tetrispec.model.loader import load_model
from tetrispec.model.model_runner import ForwardItem, ModelRunner

PRESSURE = dict(max_num_seqs=8, num_kv_blocks=72, block_size=4, max_model_len=256, max_num_batched_tokens=256)
METHODS = [("none", {}), ("fixed", dict(num_speculative_tokens=3)),
           ("tetris", dict(num_speculative_tokens=2, tetris_extra_proposals=2))]
TOL = 2e-4


@pytest.fixture(scope="module")
def reference(tiny_pair):
    """log_softmax of the target's logits over a whole sequence in one plain prefill forward: [T, V]."""
    model, _ = load_model(tiny_pair[0])
    runner = ModelRunner(model, num_blocks=128, block_size=16, dtype=torch.float32, device=torch.device("cpu"))

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        table = list(range(-(-len(token_ids) // 16)))
        return torch.log_softmax(runner.forward([ForwardItem(token_ids, 0, table)], "all"), -1)

    return logprobs


def check_against_reference(out, k: int, reference) -> None:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    ref = reference(out.prompt_token_ids + out.token_ids)
    P = len(out.prompt_token_ids)
    for j, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        row = ref[P - 1 + j]  # the position that emitted output token j
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=TOL), (j, token)
        assert len(entry.top) == k
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        top_lp, top_ids = row.topk(k)
        assert [lp for _, lp in entry.top] == pytest.approx(top_lp.tolist(), abs=TOL)
        if k:
            assert entry.top[0][0] == top_ids[0].item()


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=[m for m, _ in METHODS])
def test_logprobs_match_a_direct_target_forward(tiny_pair, reference, tmp_path, method, kw):
    draft = {} if method == "none" else dict(speculative_model=tiny_pair[1])
    llm = LLM(tiny_pair[0], spec_method=method, profile_path=str(tmp_path / "p.json"), **draft, **PRESSURE, **kw)
    prompts = mixed_prompts(16)
    greedy = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=i % 4) for i in range(8)]
    # temperature and top-k change what is sampled, not the reported (raw) logprobs
    sampled = [SamplingParams(temperature=0.8, top_k=20, max_tokens=20, ignore_eos=True, seed=i, logprobs=3)
               for i in range(8)]
    outs = llm.generate(prompts, greedy + sampled)
    assert llm.engine.scheduler.num_preemptions > 0, "tokens recomputed after preemption keep their logprobs"
    if method != "none":
        assert llm.engine.stats.accepted > 0, "accepted drafts must get the target's logprobs too"
    for out, params in zip(outs, greedy + sampled):
        check_against_reference(out, params.logprobs, reference)
    for out in outs[:8]:  # greedy: the emitted token is the most likely one
        for entry in out.logprobs:
            if entry.top:
                assert entry.top[0] == (entry.token_id, entry.logprob)
    assert any(e.top[0][0] != e.token_id for o in outs[8:] for e in o.logprobs), "sampling never left the argmax"


def test_logprobs_leave_tokens_unchanged_and_are_off_by_default(tiny_pair):
    """A batch where some requests ask runs the full-logits path: the greedy tokens must not move,
    and requests that did not ask get None."""
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="fixed", num_speculative_tokens=2)
    prompts = mixed_prompts(6)
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = llm.generate(prompts, plain)
    mixed = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2 if i % 2 else None)
             for i in range(6)]
    outs = llm.generate(prompts, mixed)
    assert [o.token_ids for o in outs] == [o.token_ids for o in base]
    assert all(o.logprobs is None for o in base)
    assert [o.logprobs is None for o in outs] == [i % 2 == 0 for i in range(6)]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=7)
    with_lp = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=7, logprobs=0)
    a, b = llm.generate([prompts[0], prompts[0]], [seeded, with_lp])
    assert a.token_ids == b.token_ids and all(e.top == [] for e in b.logprobs)


@pytest.mark.parametrize("method", ["none", "fixed"])
def test_greedy_batches_without_logprobs_skip_full_logits(tiny_pair, monkeypatch, method):
    """The argmax-only fast path (forward_greedy) stays when no request asks; one that asks leaves it."""
    draft = {} if method == "none" else dict(speculative_model=tiny_pair[1], num_speculative_tokens=2)
    llm = LLM(tiny_pair[0], spec_method=method, **draft)
    forward, calls = llm.engine.target.forward, []
    monkeypatch.setattr(llm.engine.target, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    llm.generate(mixed_prompts(4), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert calls == []
    llm.generate(mixed_prompts(1), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0))
    assert len(calls) == 12 if method == "none" else len(calls) > 0  # none: one forward per token


def test_logprobs_stop_with_the_tokens(tiny_pair):
    """A stop token inside an accepted draft window ends the output; its logprobs end there too."""
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="fixed", num_speculative_tokens=4)
    free = llm.generate(mixed_prompts(1), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    stop_at = free.token_ids[5]
    out = llm.generate(mixed_prompts(1), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        stop_token_ids=[stop_at], logprobs=1))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert [e.token_id for e in out.logprobs] == out.token_ids


def test_token_logprobs_rows_and_k():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    lp = torch.log_softmax(logits, -1)
    out = token_logprobs(logits, [[2, 0], [], [1]], [[2, 1], [], [0]], [1, None, 2])
    assert [e.token_id for e in out[0]] == [2, 1] and out[1] == [] and [e.token_id for e in out[2]] == [0]
    assert out[0][0].logprob == pytest.approx(lp[2, 2].item()) and out[0][1].logprob == pytest.approx(lp[0, 1].item())
    assert out[0][1].top == [(2, pytest.approx(lp[0, 2].item()))]
    assert out[2][0].logprob == pytest.approx(lp[1, 0].item())
    assert out[2][0].top[0] == (0, pytest.approx(lp[1, 0].item())) and out[2][0].top[1][0] in (1, 2)  # a tie
    assert token_logprobs(logits, [[0]], [[0]], [None]) == [[]]


def test_sampling_params_validate_logprobs():
    assert SamplingParams(logprobs=20).logprobs == 20
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match="^logprobs"):
            SamplingParams(logprobs=bad)

"""Speculative decoding through the batched engine is lossless.

Greedy: every method emits exactly the target's own greedy tokens, with preemption
happening. Sampling: token frequencies match target-only sampling.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import statistics
import time

import pytest
import torch
from conftest import mixed_prompts

from tetrispec import LLM, SamplingParams
from tetrispec.model import gemm_rows
from tetrispec.model.gemm_rows import MAX_ROWS, saved_plans
from tetrispec.spec.proposer import INLINE_CATCH_UP

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PRESSURE = dict(max_num_seqs=8, num_kv_blocks=72, block_size=4, max_model_len=256, max_num_batched_tokens=256)

METHODS = (
    [("fixed", dict(num_speculative_tokens=k)) for k in range(1, 7)]
    + [("tetris", dict(num_speculative_tokens=k, tetris_extra_proposals=e))
       for k, e in [(1, 1), (2, 2), (3, 1), (2, 3)]]
    + [("tetris", dict(num_speculative_tokens=2, tetris_capacity=5)),
       ("tetris", dict(num_speculative_tokens=2, spec_shadow_oracle=True)),
       ("dsd", dict(dsd_max_k=4)),
       ("tetris", dict(num_speculative_tokens=2, tetris_extra_proposals=2, tetris_capacity="auto"))]
)


@pytest.fixture(scope="module")
def target_greedy(tiny_pair):
    llm = LLM(tiny_pair[0], spec_method="none", max_num_seqs=1)
    return [o.token_ids for o in llm.generate(mixed_prompts(32), GREEDY)]


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=lambda x: str(x))
def test_greedy_identical_under_preemption(tiny_pair, target_greedy, tmp_path, method, kw):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method=method,
              profile_path=str(tmp_path / "profile.json"), **PRESSURE, **kw)
    outputs = llm.generate(mixed_prompts(32), GREEDY)
    engine = llm.engine
    assert [o.token_ids for o in outputs] == target_greedy
    assert engine.scheduler.num_preemptions > 0, "the test must exercise preemption"
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    s = engine.stats
    assert 0 <= s.accepted <= s.verified <= s.drafted
    if method != "dsd" and kw.get("tetris_capacity") != "auto":  # those may rightly choose not to draft
        assert s.accepted > 0, "the draft should agree with the target sometimes"
    per_request = sum(o.metrics["spec"]["accepted_tokens"] for o in outputs)
    assert per_request == s.accepted
    if kw.get("spec_shadow_oracle"):
        assert 0 < llm.spec_stats()["oracle_efficiency"] <= 1.0


def test_tetris_respects_capacity(tiny_pair, monkeypatch):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=2,
              tetris_extra_proposals=2, max_num_seqs=8)
    seen = []
    select = llm.engine.selector.select

    def spy(logprobs, batch):
        lengths = select(logprobs, batch)
        seen.append((int(lengths.sum()), batch.batch_size, logprobs.shape[1], lengths.tolist()))
        assert (logprobs <= 0).all() and (logprobs < 0).any(), "greedy drafts must carry real confidences"
        return lengths

    monkeypatch.setattr(llm.engine.selector, "select", spy)
    llm.engine.step_trace = []
    outs = llm.generate(mixed_prompts(8), GREEDY)
    assert seen
    # the step trace (for CostModel.replay) holds every decode step: B + sum(l_i) target tokens
    spec_steps = [t for t in llm.engine.step_trace if t.depth > 0]
    assert len(llm.engine.step_trace) == llm.spec_stats()["num_steps"]
    assert [(t.batch_size, t.tokens - t.batch_size, t.depth) for t in spec_steps] == [(B, n, K) for n, B, K, _ in seen]
    assert all(t.seconds > 0 for t in llm.engine.step_trace)
    # the draft read each prompt once: inside its first draft forward when short, else in a catch-up
    long_prompts = [len(o.prompt_token_ids) for o in outs if len(o.prompt_token_ids) + 1 > INLINE_CATCH_UP]
    assert long_prompts and sum(t.catch_up_tokens for t in llm.engine.step_trace) == sum(long_prompts)
    for total, B, K, _ in seen:
        assert total <= 2 * B
        assert K <= (4 if B >= 2 else 2)
    # requests whose deeper drafts could not be selected stopped drafting (Tetris.keep_going)
    assert any(t.draft_rows < t.batch_size for t in spec_steps if t.batch_size >= 2)
    # each draft forward's query tokens: a deeper one reads one token per request still drafting, the first
    # also each request's short lag (the bonus token after a fully accepted draft), so at least its rows
    first_rows = [t.draft_rows * t.depth - sum(t.draft_tokens[1:]) for t in spec_steps]
    assert all(len(t.draft_tokens) == t.depth for t in spec_steps)
    assert all(max(t.draft_tokens[1:], default=0) <= t.batch_size for t in spec_steps)
    assert all(t.draft_tokens[0] >= rows for t, rows in zip(spec_steps, first_rows))
    assert any(t.draft_tokens[0] > rows for t, rows in zip(spec_steps, first_rows))
    # confident requests get longer windows than others: not every step is plain fixed-k
    assert any(len(set(lengths)) > 1 for *_, lengths in seen if len(lengths) >= 2)


def test_default_method_is_tetris_with_a_draft_and_none_turns_it_off(tiny_pair):
    assert LLM(tiny_pair[0], speculative_model=tiny_pair[1]).engine.selector.name == "tetris"
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="none")
    assert llm.engine.draft is None and llm.spec_stats()["method"] == "none"


def test_set_speculation_swaps_methods_on_one_engine(tiny_pair, target_greedy, tmp_path):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="fixed", num_speculative_tokens=2,
              max_num_seqs=8, profile_path=str(tmp_path / "profile.json"))
    spec = llm.engine.config.spec
    for method, kw in [("none", {}), ("dsd", dict(dsd_max_k=3)), ("tetris", dict(tetris_capacity="auto"))]:
        llm.engine.set_speculation(dataclasses.replace(spec, method=method, **kw))
        assert llm.engine.selector.name == {"tetris": "tetris-auto"}.get(method, method)
        outs = llm.generate(mixed_prompts(8), GREEDY)
        assert [o.token_ids for o in outs] == target_greedy[:8]
    with pytest.raises(ValueError, match="spec method"):
        llm.engine.set_speculation(dataclasses.replace(spec, method="bogus"))
    plain = LLM(tiny_pair[0], spec_method="none")
    with pytest.raises(ValueError, match="needs a draft"):
        plain.engine.set_speculation(dataclasses.replace(spec, method="fixed"))


def test_draft_with_other_vocabulary_is_rejected(tiny_pair, tmp_path):
    import conftest

    from tetrispec.model.loader import save_checkpoint
    from tetrispec.model.tokenizer import Tokenizer

    other = Tokenizer.from_path(tiny_pair[1])
    other.tok.add_tokens(["<|extra_token|>"])  # one token more: vocabularies differ
    save_checkpoint(conftest.tiny_target(other.vocab_size), other, tmp_path / "draft")
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(tiny_pair[0], speculative_model=str(tmp_path / "draft"))


def _second_token_counts(llm: LLM, n: int, seed: int) -> collections.Counter:
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=seed + i) for i in range(n)]
    outs = llm.generate(["The capital of France is"] * n, params)
    return collections.Counter(tuple(o.token_ids[:3]) for o in outs), collections.Counter(
        o.token_ids[1] for o in outs)


def chi2_pvalue(a: collections.Counter, b: collections.Counter) -> float:
    """Two-sample chi-square homogeneity test over the union of categories (rare ones pooled)."""
    na, nb = sum(a.values()), sum(b.values())
    cats = [c for c in set(a) | set(b) if a[c] + b[c] >= 10]
    rare_a = na - sum(a[c] for c in cats)
    rare_b = nb - sum(b[c] for c in cats)
    rows = [(a[c], b[c]) for c in cats] + ([(rare_a, rare_b)] if rare_a + rare_b else [])
    stat = 0.0
    for x, y in rows:
        tot = x + y
        ex, ey = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    df = max(1, len(rows) - 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize(("k", "e"), [(2, 1), (1, 3)])
def test_sampling_matches_target_only_frequencies(tiny_pair, k, e):
    """(1, 3): requests stop drafting once their deeper tokens cannot be selected (Tetris.keep_going)."""
    n = 1500
    plain = LLM(tiny_pair[0], spec_method="none", max_num_seqs=64)
    spec = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=k,
               tetris_extra_proposals=e, max_num_seqs=64)
    seq_a, tok_a = _second_token_counts(plain, n, seed=0)
    seq_b, tok_b = _second_token_counts(spec, n, seed=10_000)
    s = spec.engine.stats
    assert s.accepted > 0 and s.verified > s.accepted
    if e > 1:
        assert s.drafted < (k + e) * s.spec_request_steps, "some requests should have stopped drafting early"
    assert chi2_pvalue(tok_a, tok_b) > 1e-3
    assert chi2_pvalue(seq_a, seq_b) > 1e-3


def test_batch_info_reports_what_the_draft_must_catch_up_on(tiny_pair, monkeypatch):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="fixed", num_speculative_tokens=2,
              max_num_seqs=8)
    infos = []
    depth = llm.engine.selector.depth
    monkeypatch.setattr(llm.engine.selector, "depth", lambda info: infos.append(info) or depth(info))
    prompts = mixed_prompts(4)
    outs = llm.generate(prompts, GREEDY)
    first = infos[0]  # every prompt enters decoding at once; nothing else lags yet
    assert first.entering_tokens == sum(len(o.prompt_token_ids) for o in outs) and first.lag_tokens == 0
    assert first.remaining == GREEDY.max_tokens - 1
    # drafting every step, the draft lags by at most the bonus token of a fully accepted window
    assert all(i.entering_tokens == 0 and i.lag_tokens <= i.batch_size for i in infos[1:])


def _draft_even_rows(llm: LLM, monkeypatch) -> None:
    """Every step drafts for the even rows only, as an auto-capacity probe drafts for a few."""
    monkeypatch.setattr(llm.engine.selector, "draft_rows",
                        lambda info: list(range(0, info.batch_size, 2)) if info.batch_size > 1 else None)


def test_drafting_for_some_rows_keeps_greedy_outputs(tiny_pair, target_greedy, monkeypatch):
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=2,
              tetris_extra_proposals=1, **PRESSURE)
    _draft_even_rows(llm, monkeypatch)
    llm.engine.step_trace = []
    outputs = llm.generate(mixed_prompts(32), GREEDY)
    assert [o.token_ids for o in outputs] == target_greedy
    s = llm.engine.stats
    assert 0 < s.accepted <= s.verified <= s.drafted < 3 * s.request_steps  # odd rows drafted nothing
    partial = [t for t in llm.engine.step_trace if t.depth and t.batch_size > 1]
    assert partial and all(t.draft_rows == (t.batch_size + 1) // 2 for t in partial)
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_drafting_for_some_rows_keeps_sampling_lossless(tiny_pair, monkeypatch):
    n = 1500
    plain = LLM(tiny_pair[0], spec_method="none", max_num_seqs=64)
    spec = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=2,
               tetris_extra_proposals=1, max_num_seqs=64)
    _draft_even_rows(spec, monkeypatch)
    seq_a, tok_a = _second_token_counts(plain, n, seed=0)
    seq_b, tok_b = _second_token_counts(spec, n, seed=10_000)
    assert spec.engine.stats.accepted > 0
    assert chi2_pvalue(tok_a, tok_b) > 1e-3
    assert chi2_pvalue(seq_a, seq_b) > 1e-3


def test_keep_going_decisions_are_timed_apart_from_the_draft_forwards(tiny_pair, monkeypatch):
    """The host's decisions between draft levels belong with the rest of the step: timed as drafting,
    they priced every draft level of auto well above what the draft forwards cost."""
    llm = LLM(tiny_pair[0], speculative_model=tiny_pair[1], spec_method="tetris", num_speculative_tokens=2,
              tetris_extra_proposals=1, max_num_seqs=4)
    pause = 0.05

    def slow_keep_going(info):
        def decide(logprobs: torch.Tensor) -> list[bool]:
            time.sleep(pause)
            return [True] * logprobs.shape[0]
        return decide

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(mixed_prompts(4), params)  # warm-up: on CUDA the first draft forwards pay one-off set-up
    monkeypatch.setattr(llm.engine.selector, "keep_going", slow_keep_going)
    llm.engine.step_trace = []
    llm.generate(mixed_prompts(4), params)
    spec = [r for r in llm.engine.step_trace if r.depth == 3]  # two decisions each (after levels 1 and 2)
    assert spec and all(r.seconds >= 2 * pause for r in spec)
    # timed as drafting, every step's draft time would hold both pauses; the median leaves out a host's
    # stall during one step's draft forwards (0.3-1.3 s on session 20's VM)
    assert statistics.median(r.draft_seconds for r in spec) < pause


def test_an_engine_runs_under_the_row_plans_its_profile_was_timed_with(tiny_pair, tmp_path, monkeypatch):
    """The profile keeps the plans measured when it was made; a later start measures its own (which can
    differ where two ways are close) and adopts the profile's, so what was timed is what runs (here every
    saved way counts as close: which ones are is tested in tests/model/test_gemm_rows.py)."""
    monkeypatch.setattr(gemm_rows, "ADOPT_TOLERANCE", math.inf)
    path = tmp_path / "profile.json"
    kw = dict(speculative_model=tiny_pair[1], spec_method="tetris", tetris_capacity="auto", max_num_seqs=4,
              profile_path=str(path))
    first = LLM(tiny_pair[0], **kw).engine
    saved = json.loads(path.read_text())
    assert saved["row_plans"]["target"] == saved_plans(first.target.model)
    assert saved["row_plans"]["draft"] == saved_plans(first.draft.model)
    padded = [[0] + [MAX_ROWS] * MAX_ROWS, [False] + [True] * MAX_ROWS]  # every short batch to 16 rows
    saved["row_plans"]["target"] = {shape: padded for shape in saved["row_plans"]["target"]}
    path.write_text(json.dumps(saved))
    second = LLM(tiny_pair[0], **kw).engine
    assert saved_plans(second.target.model) == saved["row_plans"]["target"]
    assert second.target.row_plan == tuple(padded[0]) and second.selector.row_plan == tuple(padded[0])
    assert saved_plans(second.draft.model) == saved["row_plans"]["draft"]

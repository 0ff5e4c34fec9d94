"""LLMEngine.step(): schedule -> (propose -> select -> verify -> accept) or plain step -> postprocess."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tetrispec.config import DEFAULT, EngineConfig, SpecConfig
from tetrispec.engine.block_manager import BlockManager
from tetrispec.engine.logprobs import TokenLogprob, token_logprobs
from tetrispec.engine.penalties import apply_penalties
from tetrispec.engine.sampler import draw_uniforms, logits_to_probs, sample
from tetrispec.engine.scheduler import Scheduler
from tetrispec.engine.sequence import Sequence, SequenceStatus
from tetrispec.model.chat_templates import resolve_chat_template
from tetrispec.model.loader import load_model
from tetrispec.model.model_runner import ForwardItem, ModelRunner
from tetrispec.model.tokenizer import IncrementalDetokenizer
from tetrispec.sampling_params import SamplingParams
from tetrispec.spec import rejection_sampler
from tetrispec.spec.auto_capacity import AutoTetris
from tetrispec.spec.cost_model import StepRecord, load_or_profile
from tetrispec.spec.proposer import DraftProposer, Proposal
from tetrispec.spec.selectors import DSD, BatchInfo, make_selector
from tetrispec.spec.stats import SpecStats

logger = logging.getLogger(__name__)

DEFAULT_DRAFT_DIR = Path(__file__).resolve().parent.parent / "assets" / "draft"


def default_draft_path() -> str | None:
    """The shipped draft for the default target, if this installation has one."""
    return str(DEFAULT_DRAFT_DIR) if (DEFAULT_DRAFT_DIR / "config.json").exists() else None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    finished: bool
    metrics: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when SamplingParams.logprobs is set


class LLMEngine:
    def __init__(self, config: EngineConfig, weights_from: LLMEngine | None = None) -> None:
        """weights_from: an engine whose loaded target, tokenizer and draft this one shares (its config
        must name the same models, dtype and device). Benchmarks run several methods side by side
        this way on one copy of the weights; caches, scheduler and selector stay each engine's own."""
        config.validate()
        self.config = config
        template = None if config.chat_template is None else resolve_chat_template(config.chat_template)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device, dtype = config.torch_device, config.torch_dtype
        self.device = device
        if weights_from is None:
            target, self.tokenizer = load_model(config.model, dtype, device)
        else:
            target, self.tokenizer = weights_from.target.model, weights_from.tokenizer
        self.model_config = target.config
        self.max_model_len = min(config.max_model_len, target.config.max_position_embeddings)
        window = target.config.sliding_window
        if window is not None and window < self.max_model_len:
            # Attention here is full; with a sliding window that is exact up to `window` tokens.
            # vLLM's --disable-sliding-window does the same: cap the context to the window.
            logger.warning("the model's sliding_window (%d) is not implemented: max_model_len capped from %d to %d",
                           window, self.max_model_len, window)
            self.max_model_len = window
        draft = self._load_draft(dtype, device, weights_from)

        block_bytes = ModelRunner.bytes_per_block(target, config.block_size, dtype)
        if draft is not None:
            block_bytes += ModelRunner.bytes_per_block(draft, config.block_size, dtype)
        num_blocks = config.num_kv_blocks or int(config.kv_cache_memory_gb * 2**30 // block_bytes)
        max_depth = make_selector(config.spec, has_draft=draft is not None).max_depth
        min_blocks = -(-(self.max_model_len + max_depth + 1) // config.block_size)
        if num_blocks < min_blocks:
            raise ValueError(f"KV cache of {num_blocks} blocks cannot hold one sequence of max_model_len "
                             f"{self.max_model_len}; raise kv_cache_memory_gb or num_kv_blocks")
        self.target = ModelRunner(target, num_blocks, config.block_size, dtype, device)
        self.draft = ModelRunner(draft, num_blocks, config.block_size, dtype, device) if draft else None
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.proposer = DraftProposer(self.draft, self.generator) if self.draft else None
        self.set_speculation(config.spec)
        self.stats = SpecStats()
        if template is not None:  # on a copy: engines sharing weights share the tokenizer object
            self.tokenizer = copy.copy(self.tokenizer)
            self.tokenizer.chat_template = template
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(target.config.eos_token_ids)
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        # Opt-in (benchmarks set a list): one StepRecord per decode step, for measured decode
        # throughput and CostModel.replay's machine-noise-free step times.
        self.step_trace: list[StepRecord] | None = None

    # ---- set-up -------------------------------------------------------------------------
    def _load_draft(self, dtype: torch.dtype, device: torch.device, weights_from: LLMEngine | None):
        spec = self.config.spec
        path = spec.speculative_model
        if path == DEFAULT:
            path = default_draft_path() if self.config.model is None else None
        if weights_from is not None and weights_from.draft is None:
            path = None  # nothing to share
        if spec.method == "none" or path is None:
            if spec.method not in (None, "none"):
                raise ValueError(f"--spec-method {spec.method} needs a draft model (--speculative-model)")
            return None
        if weights_from is not None:
            return weights_from.draft.model
        draft, draft_tok = load_model(path, dtype, device)
        if draft_tok.vocab() != self.tokenizer.vocab():
            raise ValueError(f"draft model {path} does not share the target's tokenizer (vocabularies differ)")
        if draft.config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target's {self.model_config.vocab_size}")
        return draft

    def set_speculation(self, spec: SpecConfig) -> None:
        """Build the selector for a speculation config (the draft stays loaded).

        Called at start-up; benchmarks also call it between runs to compare methods on one
        loaded engine (same weights, caches and threads). Only between runs: a selector's
        depth must fit the lookahead reserved for running requests.
        """
        spec.validate()
        if self.draft is None and spec.method not in (None, "none"):
            raise ValueError(f"--spec-method {spec.method} needs a draft model (--speculative-model)")
        self.config.spec = spec
        self.selector = make_selector(spec, has_draft=self.draft is not None)
        if isinstance(self.selector, (DSD, AutoTetris)):
            profile = self.profile_path()
            cost = load_or_profile(profile, self.target, self.draft, self.config.max_num_seqs, self.selector.max_depth,
                                   self.block_manager.num_blocks * self.config.block_size)
            # run under the row plans the profile was timed with (a start can measure others: gemm_rows.adopt_plans)
            for runner, name in ((self.target, "target"), (self.draft, "draft")):
                if runner is not None and cost.row_plans and name in cost.row_plans:
                    runner.adopt_plans(cost.row_plans[name])
            self.selector.attach_cost_model(cost, self.target.row_plan)
            if isinstance(self.selector, AutoTetris):
                self.selector.persist_to(profile.with_suffix(".calibration.json"))

    def profile_path(self) -> Path:
        """Where the step-time profile is cached: per model pair, device, dtype and threads."""
        spec, cfg = self.config.spec, self.config
        if spec.profile_path:
            return Path(spec.profile_path)
        name = f"{Path(str(cfg.model)).name}-{Path(str(spec.speculative_model)).name}"
        return (Path.home() / ".cache" / "tetrispec" / "profiles"
                / f"{name}-{self.device.type}-{cfg.dtype}-t{torch.get_num_threads()}.json")

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        V = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
            if ids and max(ids) >= V:  # an id past the vocabulary could never be sampled: a mistake
                raise ValueError(f"{name} token ids must be in [0, {V}), got {max(ids)}")
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
            if any(not isinstance(t, int) or not 0 <= t < V for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {V})")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context limit is {self.max_model_len}")
        seq = Sequence(request_id or str(next(self._ids)), ids, params, prompt=text)
        seq.stop_ids = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)))
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, len(ids))
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one forward step; returns the sequences that gained tokens."""
        batch = self.scheduler.schedule(lookahead=self.selector.max_depth if self.draft else 0)
        seqs = batch.seqs
        if not seqs:
            return []
        if batch.is_prefill:
            self._prefill(seqs)
        else:
            info = self._batch_info(seqs)
            start = time.perf_counter()
            depth = self.selector.depth(info) if self.draft and batch.lookahead_ok else 0
            draft_seconds, proposal = 0.0, None
            if depth:
                tokens, draft_seconds, proposal = self._speculate(seqs, depth, info)
                depth = proposal.depth
            else:
                self._decode(seqs)
                tokens = len(seqs)
            # the results were read back (tolist), so the clock covers the device's work too
            record = StepRecord(len(seqs), tokens, depth, info.mean_len, time.perf_counter() - start, draft_seconds,
                                proposal.catch_up_seconds if proposal else 0.0,
                                proposal.catch_up_tokens if proposal else 0, proposal.mean_rows if proposal else 0.0,
                                proposal.level_tokens if proposal else ())
            self.selector.observe_step(record)
            if self.step_trace is not None:
                self.step_trace.append(record)
        for seq in seqs:
            if seq.is_finished:
                self.scheduler.finish(seq)
            else:
                self.block_manager.truncate(seq, seq.num_tokens)
        return seqs

    def _batch_info(self, seqs: list[Sequence]) -> BatchInfo:
        """What selectors that price steps need: sizes, and what the draft would have to catch up on."""
        # prompts entering decoding this step: what a draft that speculates every step must read
        entering = sum(s.num_prompt_tokens for s in seqs if s.num_output_tokens == 1)
        lags = tuple(s.num_tokens - 1 - s.num_draft_cached for s in seqs)
        lag = sum(n for s, n in zip(seqs, lags) if s.num_output_tokens > 1)
        remaining = [min(s.params.max_tokens - s.num_output_tokens if s.params.max_tokens is not None else
                         self.max_model_len, self.max_model_len - s.num_tokens) for s in seqs]
        return BatchInfo(len(seqs), sum(s.num_tokens for s in seqs) / len(seqs), entering, lag,
                         sum(remaining) / len(seqs), lags, tuple(remaining))

    def _next_tokens(self, items: list[ForwardItem], seqs: list[Sequence]
                     ) -> tuple[list[int], list[list[TokenLogprob]] | None]:
        """One target forward, one sampled token per sequence, and its logprobs where asked for."""
        greedy, wants = all(s.params.greedy for s in seqs), _wants_logprobs(seqs)
        if greedy and not wants and not _adjusts_logits(seqs):  # argmax only: no [B, V] tensors
            return self.target.forward_greedy(items, "last", logprobs=False)[0].tolist(), None
        logits = self.target.forward(items, "last")  # [B, V] raw: what logprobs report
        penalized = apply_penalties(logits, seqs)  # the logits itself when no request has penalties
        if greedy:
            tokens = penalized.argmax(-1).tolist()
        else:
            probs = logits_to_probs(penalized, [s.params for s in seqs])
            tokens = sample(probs, draw_uniforms(seqs, 1, self.generator, probs.device).squeeze(1)).tolist()
        if not wants:
            return tokens, None
        return tokens, token_logprobs(logits, [[i] for i in range(len(seqs))], [[t] for t in tokens],
                                      [s.params.logprobs for s in seqs])

    def _prefill(self, seqs: list[Sequence]) -> None:
        items = [ForwardItem(s.token_ids, 0, s.block_table) for s in seqs]
        tokens, logprobs = self._next_tokens(items, seqs)
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            s.num_cached = s.num_tokens  # the draft reads the prompt when it first drafts (proposer)
            self.num_prompt_tokens += s.num_prompt_tokens if s.num_preemptions == 0 else 0
            self._append(s, [token], logprobs[i] if logprobs else None)

    def _decode(self, seqs: list[Sequence]) -> None:
        items = [ForwardItem([s.token_ids[-1]], s.num_tokens - 1, s.block_table) for s in seqs]
        tokens, logprobs = self._next_tokens(items, seqs)
        self.stats.num_steps += 1
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            s.num_cached = s.num_tokens
            emitted = self._append(s, [token], logprobs[i] if logprobs else None)
            for st in (s.spec, self.stats):
                st.record(0, 0, 0, emitted)

    def _speculate(self, seqs: list[Sequence], depth: int, info: BatchInfo) -> tuple[int, float, Proposal]:
        """One speculative step; returns (B + selected drafts, seconds of the draft forwards, the proposal)."""
        B = len(seqs)
        start = time.perf_counter()
        rows, keep_going = self.selector.draft_rows(info), self.selector.keep_going(info)
        if rows is None:
            proposal = self.proposer.propose(seqs, depth, keep_going)
        else:  # drafts for some of the sequences; the rest ride along with none
            proposal = self.proposer.propose([seqs[i] for i in rows], depth, keep_going).scatter(rows, B)
        if self.device.type == "cuda":  # not every selector reads the proposal back: wait for the draft here
            torch.cuda.synchronize()
        # the draft forwards alone: a separate catch-up is priced per token, and the keep-going decisions
        # are host work that belongs with the rest of the step (selection, bookkeeping), not per draft level
        draft_seconds = time.perf_counter() - start - proposal.catch_up_seconds - proposal.deciding_seconds
        drafted = proposal.drafted
        # Selection is a few hundred numbers of host-side arithmetic: read the scores back once, and
        # every selector works on (and returns) CPU tensors whatever device the models run on.
        logprobs = proposal.logprobs.cpu()
        lengths = self.selector.select(logprobs, info).clamp(max=torch.tensor(drafted))  # [B], on the CPU
        shadow = self.config.spec.shadow_oracle
        verify_lens = drafted if shadow else lengths.tolist()
        drafts = proposal.tokens.tolist()
        items = [ForwardItem([s.token_ids[-1]] + drafts[i][: verify_lens[i]], s.num_tokens - 1, s.block_table)
                 for i, s in enumerate(seqs)]
        verdict, logits = self._verify(items, seqs, proposal, drafts, lengths, verify_lens, shadow)
        emitted_tokens = [d[:a] + [t] for d, a, t in zip(drafts, verdict.num_accepted, verdict.next_tokens)]
        # the target's logprobs of those tokens, for requests that asked (not the drafts' `logprobs` above)
        emitted_logprobs = None if logits is None else _verified_logprobs(logits, seqs, verify_lens, emitted_tokens)
        self.selector.observe(logprobs, lengths.tolist(), verdict.num_accepted)
        self.stats.num_steps += 1
        if shadow:
            self.stats.oracle_accepted += sum(verdict.num_accepted)
            self.stats.oracle_bound += min(int(lengths.sum()), sum(verdict.oracle_accepted))
        for i, s in enumerate(seqs):
            a, n = verdict.num_accepted[i], s.num_tokens
            s.num_cached = n + a  # t_{n-1} and the accepted drafts; rejected entries are dead
            s.num_draft_cached = min(s.num_draft_cached, n + a)
            emitted = self._append(s, emitted_tokens[i], emitted_logprobs[i] if emitted_logprobs else None)
            for st in (s.spec, self.stats):
                st.record(drafted[i], int(lengths[i]), a, emitted)
        # what the method verifies (the shadow oracle's extra is measurement)
        return B + int(lengths.sum()), draft_seconds, proposal

    def _verify(self, items: list[ForwardItem], seqs: list[Sequence], proposal, drafts: list[list[int]],
                lengths: torch.Tensor, verify_lens: list[int], oracle: bool
                ) -> tuple[rejection_sampler.Verdict, torch.Tensor | None]:
        """One ragged target forward over every request's last token and its verified drafts; also
        returns its raw logits [sum(l_i + 1), V] when a request wants logprobs (else None)."""
        K = proposal.depth
        wants = _wants_logprobs(seqs)
        if proposal.probs is None:  # every request is greedy (see Proposal.probs)
            if wants or _adjusts_logits(seqs):  # the same argmax rule, read off full logits
                logits = self.target.forward(items, "all")
                flat = _penalize_verify(logits, seqs, drafts, verify_lens).argmax(-1)  # [sum(l_i + 1)]
            else:
                logits, (flat, _) = None, self.target.forward_greedy(items, "all", logprobs=False)
            target = _pad_ragged(flat, verify_lens, K + 1)
            verdict = rejection_sampler.verify_greedy(target, proposal.tokens, lengths.to(target.device), oracle)
            return verdict, logits if wants else None
        logits = self.target.forward(items, "all")  # [sum(l_i + 1), V]
        row_params = [s.params for s, n in zip(seqs, verify_lens) for _ in range(n + 1)]
        penalized = _penalize_verify(logits, seqs, drafts, verify_lens)
        p = _pad_ragged(logits_to_probs(penalized, row_params), verify_lens, K + 1)
        u = draw_uniforms(seqs, K + 1, self.generator, p.device)  # K + 1 draws per step whatever l_i is
        verdict = rejection_sampler.verify(p, proposal.tokens, proposal.probs, lengths.to(p.device),
                                           u[:, :K], u[:, K], oracle=oracle)
        return verdict, logits if wants else None

    # ---- postprocess --------------------------------------------------------------------
    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Append tokens (and their logprobs, one each) until a stop rule fires; returns how many were kept."""
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        params, kept = seq.params, 0
        for token in tokens:
            seq.token_ids.append(token)
            if logprobs:
                seq.logprobs.append(logprobs[kept])
            kept += 1
            if seq.num_output_tokens < params.min_tokens:  # no stop rule yet (EOS, stop ids are held back)
                if seq.num_tokens >= self.max_model_len:
                    seq.finish_reason = "length"
                    break
                if seq.num_output_tokens == params.min_tokens - 1 and params.stop:
                    # stop strings must end in the text of the next token or later: where that starts is
                    # measured on the tokens, not on what the streamed text shows so far (which depends
                    # on how many tokens each step brought, and would make speculation change the output)
                    text = IncrementalDetokenizer(self.tokenizer, seq.num_prompt_tokens).step(seq.token_ids, True)
                    seq.stop_text_from = len(text.rstrip("\ufffd"))
                continue
            if not params.ignore_eos and token in self.eos_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        self.num_generation_tokens += kept
        self._detokenize(seq)
        if seq.finish_reason:
            seq.status = SequenceStatus.FINISHED
            seq.finish_time = time.monotonic()
        return kept

    def _detokenize(self, seq: Sequence) -> None:
        ids, params = seq.token_ids, seq.params
        if seq.finish_reason == "stop" and (seq.stop_reason is None or not params.include_stop_str_in_output):
            ids = ids[:-1]  # the stop token itself is not part of the text (EOS never is)
        before = len(seq.output_text)
        seq.output_text += seq.detokenizer.step(ids, final=seq.finish_reason is not None)
        if not params.stop or seq.num_output_tokens < params.min_tokens:
            return
        longest = max(len(s) for s in params.stop)
        window_start = max(0, before - longest + 1)
        hits = [(seq.output_text.find(s, max(window_start, seq.stop_text_from - len(s) + 1)), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            seq.output_text = seq.output_text[:index + (len(stop) if params.include_stop_str_in_output else 0)]
            seq.finish_reason, seq.stop_reason = "stop", stop

    def make_output(self, seq: Sequence) -> RequestOutput:
        metrics = {
            "arrival_time": seq.arrival_time,
            "ttft": (seq.first_token_time - seq.arrival_time) if seq.first_token_time else None,
            "e2e_latency": (seq.finish_time - seq.arrival_time) if seq.finish_time else None,
            "num_prompt_tokens": seq.num_prompt_tokens,
            "num_output_tokens": seq.num_output_tokens,
            "num_preemptions": seq.num_preemptions,
            "spec": seq.spec.summary(),
        }
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.output_text,
                             seq.output_token_ids, seq.finish_reason, seq.is_finished, metrics,
                             list(seq.logprobs) if seq.params.logprobs is not None else None)

    def spec_stats(self) -> dict:
        out = self.stats.summary()
        out["method"] = self.selector.name if self.draft else "none"
        out["num_preemptions"] = self.scheduler.num_preemptions
        if isinstance(self.selector, AutoTetris):
            out["calibration"] = self.selector.calibration()
        return out


def _wants_logprobs(seqs: list[Sequence]) -> bool:
    return any(s.params.logprobs is not None for s in seqs)


def _adjusts_logits(seqs: list[Sequence]) -> bool:
    return any(s.adjusts_logits for s in seqs)


def _penalize_verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
                     verify_lens: list[int]) -> torch.Tensor:
    """Penalties on a verify forward's logits [sum(l_i + 1), V]: request i's row j follows its output
    and its first j drafts, so those drafts count, as they would in plain decoding by then (row l_i
    is the bonus position, after all of them)."""
    if not _adjusts_logits(seqs):
        return logits
    row_seqs = [s for s, n in zip(seqs, verify_lens) for _ in range(n + 1)]
    row_drafts = [d[:j] for d, n in zip(drafts, verify_lens) for j in range(n + 1)]
    return apply_penalties(logits, row_seqs, row_drafts)


def _verified_logprobs(logits: torch.Tensor, seqs: list[Sequence], verify_lens: list[int],
                       emitted: list[list[int]]) -> list[list[TokenLogprob]]:
    """logits [sum(l_i + 1), V] of a verify forward: request i's rows follow the l_j + 1 rows of
    every j < i, and its j-th emitted token (accepted draft, then correction or bonus) came from
    its row j."""
    starts = itertools.accumulate((n + 1 for n in verify_lens[:-1]), initial=0)
    rows = [list(range(r, r + len(tokens))) for r, tokens in zip(starts, emitted)]
    return token_logprobs(logits, rows, emitted, [s.params.logprobs for s in seqs])


def _pad_ragged(flat: torch.Tensor, lens: list[int], width: int) -> torch.Tensor:
    """Rows of request i (l_i + 1 of them, back to back in flat) -> [B, width, ...]; the rest stay zero, unread."""
    rows = torch.tensor([i * width + j for i, n in enumerate(lens) for j in range(n + 1)], device=flat.device)
    out = flat.new_zeros(len(lens) * width, *flat.shape[1:])
    return out.index_copy_(0, rows, flat).view(len(lens), width, *flat.shape[1:])  # one copy, not one per request

"""Compare speculation methods side by side, interleaved step by step.

A 2-core VM's speed drifts by tens of percent over minutes, more than the few percent that
separate methods, and runs of one method after another (even in A B C, C B A rounds) left up to
10% between methods that do the same work. So every method gets its own engine (one copy of
the weights, shared; its own KV caches, scheduler and selector), every engine gets the same
requests, and they advance in lockstep: the engine that has emitted the fewest tokens takes
the next step (ties: the one that waited longest). Greedy outputs are the same for every
method, so all engines walk through the same token stream at the same pace, and a slow spell
of the machine lands on every method at the same point of the workload. That matters beyond
the overall speed: when the shared host is busy, memory-bound steps (plain decoding at small
batch) slow down more than compute-heavier ones (verifying several drafts), so even the ranking
of methods depends on the moment; in lockstep every method sees the same moments. (Switching
engine every step costs no cache warmth worth measuring: five engines at batch 1, step by step
or in 2-second slices, measured the same throughputs within 2%.)

Three throughputs per method:
- measured output tokens/s: the engine's step time (prefill included);
- measured decode tokens/s: tokens emitted by decode steps over the wall time of those steps
  (draft forwards and catch-ups included; prefill, identical for every method, left out);
- modelled decode tokens/s: the same steps timed by the profiled cost model (no machine noise).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from tetrispec import SamplingParams
from tetrispec.bench.datasets import BenchRequest
from tetrispec.config import EngineConfig, SpecConfig
from tetrispec.engine.llm_engine import LLMEngine
from tetrispec.spec.auto_capacity import reliability_table
from tetrispec.spec.cost_model import CostModel, StepRecord
from tetrispec.spec.stats import SpecStats

STALL = 1.5  # stall_clipped_seconds: a step counts at most this many times its shape's median


def stall_clipped_seconds(trace: list[StepRecord]) -> float:
    """A run's decode seconds with the host's stalls taken out: each step counts at most STALL times the
    median of the same engine's steps of its shape (batch size, query tokens, draft forwards); a shape
    seen fewer than 3 times counts as timed. A reading alongside the plain wall time, for hosts whose
    stalls land on engines at random: session 21's fixed k=1 and Tetris k=1 e=1 at c = 1 (one policy
    there, the same 587 steps) took 34.06 and 32.00 s, 1.90 s of the gap in step pairs more than 50 ms
    apart, with median steps of 47.2 and 47.1 ms."""
    groups: dict[tuple, list[float]] = {}
    for r in trace:
        groups.setdefault((r.batch_size, r.tokens, r.depth), []).append(r.seconds)
    cap = {k: STALL * float(np.median(v)) if len(v) >= 3 else math.inf for k, v in groups.items()}
    return sum(min(r.seconds, cap[r.batch_size, r.tokens, r.depth]) for r in trace)


def chat_requests(tokenizer, reqs: list[BenchRequest], max_output: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each request's first turn in the chat template as token ids, and greedy parameters with the
    dataset's output length capped at max_output."""
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}]),
                                add_special_tokens=False) for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=min(r.output_len, max_output)) for r in reqs]
    return prompts, params


@dataclass
class Tally:
    seconds: float = 0.0
    output_tokens: int = 0
    decode_seconds: float = 0.0
    modelled_seconds: float = 0.0
    stats: SpecStats = field(default_factory=SpecStats)
    # every step as it ran: (its start in seconds from the run's start, its seconds, its step_trace index or
    # -1 for a prefill), which lines a slow spell up across methods
    timeline: list[tuple[float, float, int]] = field(default_factory=list)

    def summary(self) -> dict:
        s = self.stats.summary()
        out = {"seconds": round(self.seconds, 2), "output_tokens": self.output_tokens,
               "tokens_per_s": round(self.output_tokens / self.seconds, 2),
               "decode_tokens_per_s": round(s["emitted_tokens"] / self.decode_seconds, 2),
               "vsr": s["verification_success_rate"], "draft_acceptance_rate": s["draft_acceptance_rate"],
               "accepted_per_step": s["accepted_tokens"] / max(1, s["num_steps"]),
               "mean_accepted_length": s["mean_accepted_length"], "system_efficiency": s["system_efficiency"],
               "verified_tokens": s["verified_tokens"], "accepted_tokens": s["accepted_tokens"],
               "steps": s["num_steps"]}
        if self.modelled_seconds:
            out["modelled_decode_tokens_per_s"] = round(s["emitted_tokens"] / self.modelled_seconds, 2)
        return out


def calibration_fields(selector) -> dict:
    """An auto selector's calibration for a results row: ECE with its sampling floor, outcomes scored
    (after warm-up, in this process), and the raw bins, which pool across rows (pooled_calibration)."""
    est = selector.estimator
    cal = selector.calibration()
    return {"calibration_ece": cal["ece"], "calibration_ece_floor": cal["ece_floor"],
            "calibration_scored": int(est.rel_n.sum()),
            "calibration_bins": {"counts": est.rel_n.tolist(), "estimates": est.rel_pred.tolist(),
                                 "hits": est.rel_hits.tolist()}}


def pooled_calibration(rows: list[dict]) -> dict | None:
    """Reliability over every row's scored outcomes (e.g. all concurrencies of a sweep)."""
    bins = [r["calibration_bins"] for r in rows if "calibration_bins" in r]
    if not bins:
        return None
    total = {k: np.sum([b[k] for b in bins], axis=0) for k in ("counts", "estimates", "hits")}
    return {"scored": int(total["counts"].sum()),
            **reliability_table(total["counts"], total["estimates"], total["hits"])}


def kv_blocks(prompts: list[list[int]], params: list[SamplingParams], config: EngineConfig, depth: int) -> int:
    """KV blocks for the max_num_seqs longest requests at once (and at least one max_model_len
    sequence, which an engine insists on): no method is ever preempted, since a preemption's
    recompute would be charged to whichever method it happened to."""
    bs = config.block_size
    need = sorted((-(-(len(p) + sp.max_tokens + depth + 1) // bs) for p, sp in zip(prompts, params)), reverse=True)
    return max(sum(need[: config.max_num_seqs]), -(-(config.max_model_len + depth + 1) // bs)) + 1


def build_engines(methods: dict[str, dict], config: EngineConfig) -> dict[str, LLMEngine]:
    """One engine per method over one copy of the weights. methods: name -> SpecConfig fields
    (e.g. method="fixed", num_speculative_tokens=2); every other speculation field is the default."""
    engines: dict[str, LLMEngine] = {}
    first = None
    # an engine that loads the draft first: one without a draft has none to share
    for name in sorted(methods, key=lambda n: methods[n].get("method") == "none"):
        spec = SpecConfig(speculative_model=config.spec.speculative_model, profile_path=config.spec.profile_path,
                          **methods[name])
        engines[name] = LLMEngine(replace(config, spec=spec), weights_from=first)
        first = first or engines[name]
    return {name: engines[name] for name in methods}


def lockstep(engines: dict[str, LLMEngine], prompts: list[list[int]], params: list[SamplingParams],
             cost: CostModel | None) -> tuple[dict[str, Tally], int]:
    """Run the same requests on every engine, stepping the one that has emitted the fewest tokens.

    Returns each method's tally and how many requests' outputs differ from the first engine's
    (greedy outputs should not differ; float rounding in different batch shapes can flip a near tie).
    """
    seqs, tallies, emitted, waited = {}, {}, {}, {}
    for name, engine in engines.items():
        engine.stats, engine.step_trace = SpecStats(), []
        seqs[name] = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        tallies[name], emitted[name], waited[name] = Tally(), 0, 0
    clock, t0 = 0, time.perf_counter()
    while live := [n for n, e in engines.items() if e.has_unfinished()]:
        name = min(live, key=lambda n: (emitted[n], waited[n]))
        engine = engines[name]
        before, traced = engine.num_generation_tokens, len(engine.step_trace)
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        tallies[name].seconds += seconds
        tallies[name].timeline.append((start - t0, seconds, traced if len(engine.step_trace) > traced else -1))
        emitted[name] += engine.num_generation_tokens - before
        clock += 1
        waited[name] = clock
    reference = [s.output_token_ids for s in next(iter(seqs.values()))]
    differ = 0
    for name, engine in engines.items():
        tally = tallies[name]
        tally.output_tokens = sum(s.num_output_tokens for s in seqs[name])
        tally.decode_seconds = sum(r.seconds for r in engine.step_trace)
        if cost is not None:
            tally.modelled_seconds = cost.replay(engine.step_trace)
        tally.stats = engine.stats
        differ = max(differ, sum(s.output_token_ids != ref for s, ref in zip(seqs[name], reference)))
    return tallies, differ


def run_alone(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """Run requests on one engine to completion, untimed."""
    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
    while engine.has_unfinished():
        engine.step()


def warm_up(engines: dict[str, LLMEngine], prompt: list[int]) -> None:
    """One short request per engine outside the timed run (selectors, profiles, lazy allocations)."""
    for engine in engines.values():
        run_alone(engine, [prompt], [SamplingParams(temperature=0, max_tokens=8)])

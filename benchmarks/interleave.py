"""Compare speculation methods on one loaded engine, interleaved in rounds.

A 2-core VM's speed drifts by tens of percent over an hour, more than the few percent that
separate methods. So every method runs on the same engine (same weights, caches, threads;
only the selector is swapped), the prompts are split into rounds, and each round runs every
method on that round's prompts, in reverse order every other round (A B C, C B A): drift lands
on all methods alike, and
totals are summed over rounds. Selectors keep their learned state from round to round.

Three throughputs per method:
- measured output tokens/s: wall clock of the whole runs, prefill included;
- measured decode tokens/s: tokens emitted by decode steps over the wall time of those steps
  (draft forwards and catch-ups included; prefill, identical for every method, left out);
- modelled decode tokens/s: the same steps timed by the profiled cost model (no machine noise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tetrispec import LLM, SamplingParams
from tetrispec.bench.datasets import BenchRequest
from tetrispec.config import SpecConfig
from tetrispec.spec.auto_capacity import reliability_table
from tetrispec.spec.cost_model import CostModel
from tetrispec.spec.stats import SpecStats


def chat_requests(tokenizer, reqs: list[BenchRequest], max_output: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each request's first turn in the chat template as token ids, and greedy parameters with the
    dataset's output length capped at max_output."""
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}]),
                                add_special_tokens=False) for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=min(r.output_len, max_output)) for r in reqs]
    return prompts, params


def method_spec(base: SpecConfig, **fields) -> SpecConfig:
    """A method's speculation config: the engine's draft and profile, every other field the method's own
    or the default (a field left over from the engine's own method must not leak in)."""
    return SpecConfig(speculative_model=base.speculative_model, profile_path=base.profile_path, **fields)


@dataclass
class Tally:
    seconds: float = 0.0
    output_tokens: int = 0
    decode_seconds: float = 0.0
    modelled_seconds: float = 0.0
    stats: SpecStats = field(default_factory=SpecStats)

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


class MethodSwitch:
    """Puts one method's selector on the engine, building it once and reusing it afterwards."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.selectors = {}

    def use(self, name: str, spec: SpecConfig) -> None:
        engine = self.llm.engine
        if name in self.selectors:
            engine.config.spec, engine.selector = spec, self.selectors[name]
        else:
            engine.set_speculation(spec)
            self.selectors[name] = engine.selector


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


def run_once(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], cost: CostModel | None,
             tally: Tally) -> None:
    engine = llm.engine
    engine.stats, engine.step_trace = SpecStats(), []
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    tally.seconds += time.perf_counter() - start
    tally.output_tokens += sum(len(o.token_ids) for o in outs)
    tally.decode_seconds += sum(r.seconds for r in engine.step_trace)
    if cost is not None:
        tally.modelled_seconds += cost.replay(engine.step_trace)
    tally.stats.merge(engine.stats)


def compare(llm: LLM, methods: dict[str, dict], rounds: list[tuple[list, list]], cost: CostModel | None,
            switch: MethodSwitch | None = None) -> dict[str, Tally]:
    """methods: name -> SpecConfig fields (e.g. method="fixed", num_speculative_tokens=2); the rest default."""
    switch = switch or MethodSwitch(llm)
    specs = {name: method_spec(llm.engine.config.spec, **kw) for name, kw in methods.items()}
    names = list(methods)
    tallies = {name: Tally() for name in names}
    warm = SamplingParams(temperature=0, max_tokens=8)
    for name in names:  # build every selector (and any lazy allocation) outside the timed runs
        switch.use(name, specs[name])
        llm.generate([rounds[0][0][0]], warm, use_tqdm=False)
    for r, (prompts, params) in enumerate(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # A B C, C B A, ...: linear drift cancels
            switch.use(name, specs[name])
            run_once(llm, prompts, params, cost, tallies[name])
    return tallies

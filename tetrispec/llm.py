"""Offline API: LLM(...).generate(prompts, params) -> outputs in input order."""

from __future__ import annotations

from tqdm import tqdm

from tetrispec.config import DEFAULT, EngineConfig, SpecConfig
from tetrispec.engine.llm_engine import LLMEngine, RequestOutput
from tetrispec.sampling_params import SamplingParams

SPEC_KEYS = {
    "speculative_model": "speculative_model",
    "spec_method": "method",
    "num_speculative_tokens": "num_speculative_tokens",
    "tetris_extra_proposals": "tetris_extra_proposals",
    "tetris_turn_on_batch_size": "tetris_turn_on_batch_size",
    "tetris_capacity": "tetris_capacity",
    "dsd_max_k": "dsd_max_k",
    "spec_shadow_oracle": "shadow_oracle",
    "profile_path": "profile_path",
}


def build_config(model: str | None = None, speculative_model: str | None = DEFAULT, **kwargs) -> EngineConfig:
    """EngineConfig from flat keywords (the same names as the CLI flags)."""
    spec_kwargs = {SPEC_KEYS[k]: kwargs.pop(k) for k in list(kwargs) if k in SPEC_KEYS}
    spec = SpecConfig(speculative_model=speculative_model, **spec_kwargs)
    try:
        return EngineConfig(model=model, spec=spec, **kwargs)
    except TypeError as e:
        raise ValueError(f"unknown engine option: {e}") from None


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(build_config(model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        for p in param_list:  # validate everything before any work starts
            p.validate()
        seqs = []
        try:
            for prompt, sp in zip(prompts, param_list):
                seqs.append(self.engine.add_request(prompt, sp))
        except ValueError:
            for seq in seqs:  # nothing runs unless every request is valid
                self.engine.abort_request(seq.request_id)
            raise
        show = len(seqs) > 1 if use_tqdm is None else use_tqdm
        bar = tqdm(total=len(seqs), desc="generate", disable=not show)
        try:
            while self.engine.has_unfinished():
                for seq in self.engine.step():
                    bar.update(seq.is_finished)
        finally:
            bar.close()
            for seq in seqs:
                if not seq.is_finished:
                    self.engine.abort_request(seq.request_id)
        return [self.engine.make_output(s) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in conversations]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(ids, params, use_tqdm)
        for out, prompt in zip(outputs, prompts):
            out.prompt = prompt
        return outputs

    def spec_stats(self) -> dict:
        return self.engine.spec_stats()

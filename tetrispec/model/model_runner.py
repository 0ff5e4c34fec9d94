"""Owns one model and its KV cache pool; turns ragged batches into one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetrispec.model.attention import AttentionMetadata
from tetrispec.model.cpu_kernel import cpu_ops
from tetrispec.model.gemm_rows import adopt_plans, heaviest_plan, plan_row_padding
from tetrispec.model.llama import LlamaForCausalLM


@dataclass
class ForwardItem:
    """New tokens of one sequence: they occupy positions start .. start + len(tokens) - 1."""

    tokens: list[int]
    start: int
    block_table: list[int]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        cfg = model.config
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        # decode / verify attention straight over the paged cache on CPU, when the kernel builds
        self.use_kernel = device.type == "cpu" and cpu_ops() is not None
        if device.type == "cpu":  # short matmuls at the row counts this CPU's BLAS runs fastest
            plan_row_padding(model)
        # row_plan[n]: the rows a forward of n tokens (n < len) mostly runs its matmuls at (None: as is)
        self.row_plan = heaviest_plan(model)
        self.workspace = (torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device))

    def adopt_plans(self, saved: dict[str, list[list]]) -> None:
        """Run the short matmuls as a step-time profile's saved plans say (gemm_rows.adopt_plans)."""
        adopt_plans(self.model, saved)
        self.row_plan = heaviest_plan(self.model)

    @staticmethod
    def bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], logits_for: str = "last") -> torch.Tensor | None:
        """Run the batch; logits_for is "last" ([B, V]), "all" ([T, V]) or "none"."""
        hidden = self._hidden(items, logits_for)
        return None if hidden is None else self.model.compute_logits(hidden)

    @torch.inference_mode()
    def forward_greedy(self, items: list[ForwardItem], logits_for: str = "last",
                       logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The argmax token and (unless logprobs=False) its log-softmax of each "last" or "all" row,
        without full-vocabulary probabilities.

        Greedy requests need nothing else, and skipping the [rows, V] probability tensors saves
        more time per step than the draft model's forward costs.
        """
        return self.model.greedy_head(self._hidden(items, logits_for), logprobs)

    def _hidden(self, items: list[ForwardItem], logits_for: str) -> torch.Tensor | None:
        query_lens = [len(it.tokens) for it in items]
        context_lens = [it.start + q for it, q in zip(items, query_lens)]
        meta = AttentionMetadata.build(query_lens, context_lens, [it.block_table for it in items],
                                       self.block_size, self.device, kernel=self.use_kernel)
        meta.workspace = self._workspace(meta.gather_blocks)
        flat = [t for it in items for t in it.tokens]
        positions = [p for it, q in zip(items, query_lens) for p in range(it.start, it.start + q)]
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)
        if logits_for == "none":
            return None
        if logits_for == "last":
            last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
            hidden = hidden[last]
        return hidden

    def _workspace(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather buffers for num_blocks KV blocks, grown (never shrunk) as contexts grow."""
        cfg = self.model.config
        needed = num_blocks * self.block_size * cfg.num_key_value_heads * cfg.head_dim
        if self.workspace[0].numel() < needed:
            size = max(needed, 2 * self.workspace[0].numel())
            self.workspace = tuple(torch.empty(size, dtype=w.dtype, device=w.device) for w in self.workspace)
        return self.workspace

"""tetrispec: LLM inference with Tetris, optimal draft-token selection for batch speculative decoding."""

import os

# Every decode step streams the weights and the KV cache from memory; on 4 KiB pages the CPU also walks
# page tables for each page it touches. Set before the first allocation of 2 MiB or more (torch reads it
# once, then), this puts torch's large CPU allocations on transparent huge pages where the kernel allows
# them (`enabled` = always or madvise): target forwards 0.4-6% faster on the dev VM (benchmarks/huge_pages.py).
# A setting of the caller's own (0 to opt out) wins. No effect on GPU memory.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tetrispec.llm import LLM  # noqa: E402
from tetrispec.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

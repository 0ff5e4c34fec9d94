"""tetrispec: LLM inference with Tetris, optimal draft-token selection for batch speculative decoding."""

from tetrispec.llm import LLM
from tetrispec.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

"""The C++ paged-attention kernel for CPU decode and verify steps, compiled on first use.

PyTorch has no paged attention on CPU: the fallback gathers each sequence's blocks into a
padded tensor per layer and runs SDPA on it (attention.py), which reads the cache twice and
writes it once. The kernel (csrc/paged_attention.cpp) reads it once, in place. It is built
with the C++ compiler torch.utils.cpp_extension finds (about a minute, once per machine:
cached under ~/.cache/torch_extensions); without a compiler, or with
TETRISPEC_CPU_KERNEL=0, the engine keeps the PyTorch path, which computes the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"


@functools.cache
def paged_attention_op():
    """The compiled kernel's paged_attention function, or None when it is off or cannot be built."""
    if os.environ.get("TETRISPEC_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        # -march=native code must not be reused on another CPU: the build name carries the source and the host
        tag = hashlib.sha1(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:12]
        module = load(name=f"tetrispec_paged_attention_{tag}", sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
        return module.paged_attention
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch path still works
        reason = (str(e).splitlines() or [""])[0]
        print(f"tetrispec: CPU paged-attention kernel unavailable ({type(e).__name__}: {reason}); "
              "using the PyTorch path", file=sys.stderr)
        return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""

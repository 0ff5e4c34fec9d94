"""The C++ kernels for CPU decode and verify steps, compiled on first use.

PyTorch has no paged attention on CPU: the fallback gathers each sequence's blocks into a
padded tensor per layer and runs SDPA on it (attention.py), which reads the cache twice and
writes it once. The kernel (csrc/paged_attention.cpp) reads it once, in place. The layer ops
(csrc/layer_ops.cpp) fuse the residual add + RMSNorm, RoPE and SiLU-and-multiply, each several
PyTorch ops whose dispatch costs more than their arithmetic at decode sizes. They are built
with the C++ compiler torch.utils.cpp_extension finds (about a minute, once per machine:
cached under ~/.cache/torch_extensions); without a compiler, or with TETRISPEC_CPU_KERNEL=0,
the engine keeps the PyTorch code, which computes the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "bindings.cpp", CSRC / "paged_attention.cpp", CSRC / "layer_ops.cpp"]


@functools.cache
def cpu_ops():
    """The compiled module (paged_attention, rms_norm, rope_, silu_and_mul), or None when it is off
    or cannot be built."""
    if os.environ.get("TETRISPEC_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        # -march=native code must not be reused on another CPU: the build name carries the sources and the host
        tag = hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES) + _cpu_flags().encode()).hexdigest()[:12]
        name = f"tetrispec_cpu_ops_{tag}"
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where torch would build
        build_dir = Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir / "lock")
        return load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch code still works
        reason = (str(e).splitlines() or [""])[0]
        print(f"tetrispec: CPU kernels unavailable ({type(e).__name__}: {reason}); using the PyTorch path",
              file=sys.stderr)
        return None


STALE_LOCK_SECONDS = 900  # a build takes about a minute; a lock this old was left by a killed process


def _clear_stale_lock(lock: Path) -> None:
    """torch's build lock is a plain file that a killed build leaves behind, and every later
    load() then waits on it forever: an engine start-up must not hang on a dead process's lock."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            print(f"tetrispec: removed a stale build lock ({lock})", file=sys.stderr)
    except FileNotFoundError:
        pass


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""

"""Building the CPU kernels must not hang on a lock a killed build left behind."""

from __future__ import annotations

import os
import time

from tetrispec.model import cpu_kernel


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.write_text("")
    fresh.write_text("")
    old = time.time() - cpu_kernel.STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    cpu_kernel._clear_stale_lock(stale)
    cpu_kernel._clear_stale_lock(fresh)  # another process may be building right now
    cpu_kernel._clear_stale_lock(tmp_path / "missing")
    assert not stale.exists() and fresh.exists()

"""Importing tetrispec puts torch's large CPU allocations on transparent huge pages (tetrispec/__init__.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# a 64 MiB tensor, written, then how much of this process's anonymous memory is on huge pages (kB)
PROBE = """
import tetrispec, torch
x = torch.ones(16 << 20)
rollup = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup") if ":" in line)
print(int(rollup["AnonHugePages"].split()[0]))
"""


def huge_kb(setting: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="the kernel offers no transparent huge pages here (not Linux, or THP set to never)")
def test_large_allocations_land_on_huge_pages_unless_the_caller_opts_out():
    assert huge_kb(None) >= 32 << 10  # most of the 64 MiB
    if "[always]" not in THP.read_text():  # with `always` the kernel uses them whatever torch asks
        assert huge_kb("0") == 0

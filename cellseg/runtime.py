"""Process-wide settings that make CPU training faster.

glibc's malloc hands large activation buffers back to the OS after every step and page-faults them
in again on the next; keeping them (no mmap for big blocks, no trimming) made the U-Net's CPU
training step 1.43x faster at +40% peak RSS on this project's 2-core machines (batch 4 at 400x400), and cut
CPU time per step by 17-19% in benchmarks/train_step.py (docs/benchmarks.md). ``CELLSEG_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 1 << 30  # mallopt takes an int; 1 GiB keeps step-sized buffers resident


def tune_malloc() -> bool:
    """Apply the malloc settings on glibc Linux; returns whether they were applied."""
    if os.environ.get("CELLSEG_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))

"""Keep freed memory in the process: glibc ``malloc`` settings for CPU training.

glibc serves allocations above its mmap threshold (128 KiB at start, raised
only as far as the sizes it has seen freed) with fresh ``mmap`` pages and gives
freed memory at the top of the heap back to the kernel. A CPU training step
allocates and frees the same activation buffers every step, so the kernel
zero-fills and maps those pages again each time: the demo TAE's step took
~50,000 page faults and spent a quarter of its CPU time in the kernel. Serving
everything below glibc's ceiling (32 MiB) from the heap and never trimming it
keeps the pages mapped: the step then takes a few dozen faults and runs
1.2-1.6x faster (benchmarks/bench_allocator.py, docs/BENCHMARKS.md). The
price is that the process keeps its peak heap resident until it exits, which
is what a training process wants.
PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``) reaches the same end by
preloading jemalloc or tcmalloc; this needs no extra library.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest accepted mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_MAX = 32 * 2**20
# Free heap memory above this is returned to the kernel: effectively never.
_TRIM_NEVER = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it.

    Process-wide and idempotent. Returns whether the settings are in force:
    ``False`` off Linux or where the C library has no working ``mallopt``
    (musl's accepts nothing), in which case nothing changes.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)
    )
    return _applied

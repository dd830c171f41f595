"""glibc malloc settings for a long-running model server.

A decoding batch allocates and frees tensors of a few MB at every step (key/value room, logits,
activations). glibc serves blocks above its mmap threshold with a fresh ``mmap`` and returns them
with ``munmap``: page faults and zeroed pages at every step, until its dynamic threshold has crept
up. Fixing the threshold at glibc's ceiling (32 MB on 64-bit) and keeping freed heap memory
(no trimming) makes the server run at its warmed-up speed from the first request, as preloading
jemalloc / tcmalloc does in PyTorch's CPU inference guides, without another library. Measured
(docs/BENCHMARKS.md, issue 17, with the same values set through glibc's ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` environment variables): 8 askers 5.99 / 7.02 / 7.80 answers/s over three consecutive
45 s phases against 5.33 / 6.50 / 6.97 with glibc's defaults. The cost: RSS keeps its high-water
mark. No-op where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("freshlm")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
NO_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIM))
    if not done:
        log.warning("glibc mallopt refused the serving thresholds; allocator left at its defaults")
    return done

"""glibc's malloc set to keep freed memory for reuse (Linux; elsewhere nothing changes).

By default glibc hands blocks above a few hundred KB out as fresh mmap regions and returns freed
memory to the kernel. A meta-learning step allocates and frees activations of a few MB hundreds of
times, so each one is paged in again (zero-filled, one fault per 4 KB page) at every step. With the
mmap threshold at glibc's maximum (32 MB) and the trim threshold at 1 GB, freed blocks are reused
from the heap instead: the same arithmetic, fewer page faults (bench/RESULTS.md). Peak memory is
unchanged: it is still the high-water mark of what is live.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20                       # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the settings above once; True when they took effect. Skipped off Linux, where libc
    is not glibc, when GLIBC_TUNABLES already sets malloc options, or with BIDF_MALLOC=default."""
    if sys.platform != "linux" or os.environ.get("BIDF_MALLOC") == "default" \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):       # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

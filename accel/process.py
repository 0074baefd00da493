"""Process-wide settings for speed, made once by every entry point before torch starts work.

OpenMP: idle worker threads wait passively instead of spinning. On a busy or small CPU spinning makes
every op crawl (a 2-thread ZO step measured 6x slower); on a quiet one passive waiting costs nothing.
It must be in the environment before torch loads its OpenMP runtime; an exported value wins.

glibc's malloc: by default it hands blocks above a few hundred KB out as fresh mmap regions and returns
freed memory to the kernel. A meta-learning step allocates and frees activations of a few MB hundreds of
times, so each is paged in again (one zero-filled fault per 4 KB page) at every step. With the mmap
threshold at glibc's maximum (32 MB) and the trim threshold at 1 GB, freed blocks are reused from the
heap instead: the same arithmetic, 10-20x fewer page faults; peak memory is still the high-water mark of
what is live. Skipped off Linux, without glibc, when GLIBC_TUNABLES sets malloc options, or with
BIDF_MALLOC=default. Figures: bench/RESULTS.md.

This module imports nothing heavy: entry points call setup_process() before importing torch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20                       # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def setup_process() -> None:
    """Passive OpenMP waiting (unless exported otherwise) and glibc's malloc keeping freed memory."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """glibc's malloc set as above, once; True when the settings took effect."""
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

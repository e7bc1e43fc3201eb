"""Process memory: hand freed heap pages back to the OS, and read the peak resident set size.

glibc keeps freed memory in its heap for reuse: after a model is loaded (fp32 copies of bf16 shards
freed), cast (the fp32 weights freed) or exported, RSS stays at the high-water mark although the
memory is free. ``malloc_trim(0)`` returns it. We do not set ``M_MMAP_THRESHOLD``: a fixed threshold
makes every large temporary tensor of the calibration passes a fresh ``mmap`` (page faults on each).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (not Linux, musl, no libc found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    fn = getattr(libc, "malloc_trim", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Collect garbage, then return free heap pages to the OS (glibc ``malloc_trim(0)``).

    Call after big frees (loading, casting, exporting). False where glibc is absent (a no-op)."""
    gc.collect()
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key: N kB`` line of a ``/proc`` file in bytes; None where there is none (no ``/proc``)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``VmHWM`` in ``/proc/self/status``; 0 elsewhere)."""
    return _proc_bytes("/proc/self/status", "VmHWM") or 0


def peak_rss_mb() -> float:
    """:func:`peak_rss_bytes` in MiB, rounded for reports."""
    return round(peak_rss_bytes() / 2**20, 1)


def available_bytes() -> int | None:
    """Memory the kernel can still give this process (``MemAvailable`` in ``/proc/meminfo``); None elsewhere."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")

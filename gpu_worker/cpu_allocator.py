"""glibc's malloc set up for the CPU path: freed activations are kept for the next forward.

PyTorch has no caching allocator on the CPU: every tensor is a ``malloc``. glibc serves blocks
over its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives them back with ``munmap``
on free, and trims the heap top as soon as it is free. An htdemucs forward allocates dozens of
such activations (33-66 MB each), so every segment faulted its working set in again and the
kernel zeroed it: ~4 of 27 CPU seconds were system time on a 20 s song, and the forward itself
waited on the faults. With mmap off and trimming off, the same blocks are reused from the heap:
system time fell to ~1 s and a segment ran ~8-10% faster. The price is fragmentation: a short
song's peak RSS, which is a forward's, rose ~100 MB (benchmarks/RESULTS.md).

It is set once when a model is prepared for the CPU, for processes that run models (the CLI,
a run worker, a worker container). After a job's last forward, :func:`release_freed_memory`
hands the free pages back, so what comes next (encoding, the next job's decode) does not sit on
top of a forward's retained gigabyte.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The user's own glibc tuning wins: any of these in the environment and nothing is changed.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
# STEMSET_CPU_KEEP_HEAP=0 keeps glibc's defaults: ~8% slower forwards, ~100 MB lower peak RSS on
# a short song (the kept heap's fragmentation; benchmarks/RESULTS.md).
KEEP_HEAP_ENV = "STEMSET_CPU_KEEP_HEAP"
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: 2 GB of free heap top before a trim, i.e. never

_applied: bool | None = None
_libc: ctypes.CDLL | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (no per-block mmap, no trimming). Once per process.

    Returns whether the setting is in effect: False off glibc (macOS, musl), with
    ``STEMSET_CPU_KEEP_HEAP=0``, or when the user set their own malloc tuning in the environment.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def release_freed_memory() -> None:
    """Give the heap's free pages back to the kernel (``malloc_trim``) once a job's forwards are
    done; a no-op unless :func:`keep_freed_memory` is in effect."""
    if _applied and _libc is not None:
        _libc.malloc_trim(0)


def _apply() -> bool:
    global _libc
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    if os.environ.get(KEEP_HEAP_ENV, "").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _libc = libc
    # mallopt returns 1 on success; trim first, so a failure leaves mmap on (the safe side).
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) and mallopt(_M_MMAP_MAX, 0))

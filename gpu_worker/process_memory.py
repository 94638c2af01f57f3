"""This process's peak resident memory, for job metadata and the benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB (MiB).

    VmHWM is the process's own high-water mark. ``ru_maxrss`` survives ``exec``, so a process
    started by a large parent (pytest, the API, a benchmark harness that loaded torch) would
    report at least the parent's size; it is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

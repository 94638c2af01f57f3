"""OpenMP settings for the CPU path, which only take effect if set before torch loads.

torch's OpenMP runtime (libgomp) lets a thread that finished its share of an operator spin for
a while before it sleeps. On a machine whose cores are shared with other work, spinning threads
take the cores from the threads still computing: a 7.8 s htdemucs segment took 5.3-9.7 s with
spinning against 5.3-5.8 s with passive waiting at a load average of ~4 on 2 cores
(benchmarks/cpu_inference.py, ``sdpa`` against ``sdpa_passive``; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def prefer_passive_openmp(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose a policy.

    Must run before torch is imported (the runtime reads it once, when it loads). Returns
    whether the setting will take effect in this process.
    """
    if "torch" in sys.modules:
        return False
    environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")
    return True

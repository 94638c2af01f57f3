"""The CPU path keeps freed memory for reuse (gpu_worker.cpu_allocator): no page faults per forward.

Each case runs in its own process: malloc settings are process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 64 MB tensor (the size of an htdemucs activation) round after round
# and count the minor page faults of the last ten: with glibc's defaults every round maps fresh
# pages (~16k faults); kept, the heap grows for the first few rounds (an aligned block does not
# fit the hole the last one left until holes merge) and is then reused.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from gpu_worker import cpu_allocator, inference
    if sys.argv[1] == "prepare":  # the way every CPU run gets it: preparing a model for the CPU
        inference.prepare_model(torch.nn.Linear(2, 2), torch.device("cpu"), "fp32", inference.EngineStats())
    applied = cpu_allocator.keep_freed_memory()
    for _ in range(15):
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.ones(16 << 20)
        del t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    held = rss_mb()
    cpu_allocator.release_freed_memory()  # after a job's last forward
    print(json.dumps({"applied": applied, "faults": faults, "released_mb": held - rss_mb()}))
""")

ROUND_PAGES = (64 << 20) // 4096


def _child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "STEMSET_"))}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def test_preparing_a_model_for_the_cpu_stops_per_round_page_faults():
    kept = _child("prepare")
    assert kept["applied"] is True
    assert kept["faults"] < ROUND_PAGES // 2  # ten rounds, not even half of one round's pages
    assert kept["released_mb"] > 48  # the kept 64 MB block goes back to the kernel at the end of a job


def test_without_it_every_round_faults_its_pages_in():
    # The control: the same loop under glibc's defaults (a user setting keeps them) faults every round.
    default = _child("plain", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert default["applied"] is False  # the user's own malloc tuning is left alone
    assert default["faults"] > 5 * ROUND_PAGES


def test_stemset_cpu_keep_heap_0_keeps_glibc_defaults():
    assert _child("prepare", STEMSET_CPU_KEEP_HEAP="0")["applied"] is False

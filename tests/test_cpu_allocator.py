"""The CPU path keeps freed memory for reuse (gpu_worker.cpu_allocator): no page faults per forward,
for a job with enough forwards for it to pay.

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

from gpu_worker.cpu_allocator import KEEP_HEAP_MIN_FORWARDS

ROOT = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 64 MB tensor (the size of an htdemucs activation) round after round
# and count the minor page faults of the last ten: with glibc's defaults every round maps fresh
# pages (~16k faults); kept, the heap grows for the first few rounds (an aligned block does not
# fit the hole the last one left until holes merge) and is then reused.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from gpu_worker import cpu_allocator
    applied = cpu_allocator.keep_freed_memory_for(int(sys.argv[1]))  # a CPU job of this many forwards
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


# A real CPU job in a fresh process (tiny model: 1 s segments, a forward every 0.75 s of audio):
# whether the job left the kept heap in effect, and how many forwards it ran.
_JOB = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import soundfile as sf
    from gpu_worker import cpu_allocator
    from gpu_worker.demo_models import make_model_repo
    from gpu_worker.job import SeparationJob, StorageRef
    from gpu_worker.strategy import parse_strategy
    from gpu_worker.worker import run_job
    from tests.audio_fixtures import music_like
    root = Path(sys.argv[2])
    sf.write(str(root / "song.wav"), music_like(float(sys.argv[1]), seed=1).T, 44100)
    tree = {"_": "htdemucs", "drums": "drums", "bass": "bass", "other": "other", "vocals": "vocals"}
    result = run_job(SeparationJob(
        job_id="heap", input_key="song.wav", output_prefix="out", strategy_name="s",
        strategy=parse_strategy("s", tree).to_tree(), fingerprint="f" * 16,
        storage=StorageRef("local", root=str(root)), output_format="flac", bitrate_kbps=None,
        model_repo=str(make_model_repo(root / "models")), device="cpu", seed=1))
    print(json.dumps({"applied": bool(cpu_allocator._applied), "segments": result.segments}))
""")


def _child(arg: str, **env: str) -> dict:
    return _run(_CHILD, [arg], env)


def _run(code: str, args: list[str], env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "STEMSET_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def test_a_job_with_enough_forwards_stops_per_round_page_faults():
    kept = _child(str(KEEP_HEAP_MIN_FORWARDS))
    assert kept["applied"] is True
    assert kept["faults"] < ROUND_PAGES // 2  # ten rounds, not even half of one round's pages
    assert kept["released_mb"] > 48  # the kept 64 MB block goes back to the kernel at the end of a job


def test_without_it_every_round_faults_its_pages_in():
    # The controls under glibc's defaults: a job of few forwards, and the user's own malloc tuning.
    for default in (_child(str(KEEP_HEAP_MIN_FORWARDS - 1)), _child("100", MALLOC_MMAP_THRESHOLD_=str(1 << 20))):
        assert default["applied"] is False
        assert default["faults"] > 5 * ROUND_PAGES


def test_stemset_cpu_keep_heap_0_keeps_glibc_defaults():
    assert _child("100", STEMSET_CPU_KEEP_HEAP="0")["applied"] is False


@pytest.mark.parametrize(("seconds", "applied"), [(2.0, False), (8.0, True)])
def test_a_cpu_job_keeps_the_heap_only_when_it_runs_enough_forwards(tmp_path, seconds, applied):
    job = _run(_JOB, [str(seconds), str(tmp_path)], {})
    assert (job["segments"] >= KEEP_HEAP_MIN_FORWARDS) is applied  # the two songs straddle the threshold
    assert job["applied"] is applied

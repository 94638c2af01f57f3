"""The whole job, end to end, over a warm backlog of songs: today's serial path against the pipeline.

    python benchmarks/job.py --json --seconds 240 --jobs 4 --format m4a --model tiny --device cpu

``baseline`` runs the worker as it was before issue 12 (``git archive --baseline-ref``, default
8ce9797: run_job with pyloudnorm and one stem after another), in its own subprocess.
Each song is read from a local object store (the canonical 16-bit FLAC a recording asset writes),
decoded, separated, measured, encoded and published (stems to staging keys, then the manifest),
exactly as a worker does it. Two modes run in the same invocation, each in a fresh subprocess
(its own peak RSS) after a short warm-up job (models loaded, codecs and scipy imported: a warm
worker):

* ``serial``: ``gpu_worker.worker.run_job`` one song after another (the path before the pipeline;
  it holds the device from a song's first byte to its manifest);
* ``pipelined``: ``gpu_worker.pipeline.JobPipeline`` (the device separates song k+1 while song k
  is finished on CPU threads): Option B;
* ``handoff``: Option A. The pipeline's device side writes each song's float32 stems to the store
  and lets go (``held_s`` ends there); then ``gpu_worker.handoff.finish_handoff`` (the CPU
  function's work) finishes each song, one after another. ``cpu_core_s`` counts both sides,
  ``cpu_function_s`` the CPU function's; the store is a local folder, so the transfer over a
  network is not in these seconds: ``handoff_mb`` says how much would cross it.

Per song: ``held_s`` (seconds the separator device is reserved for the song: the GPU seconds it
is billed in a backlog), ``separate_s``, ``decode_s``, ``analyse_s`` (summed over stems),
``encode_s`` (wall time of measuring + encoding the stems), ``publish_s``, ``cpu_core_s`` (process
CPU seconds, every thread, cut at the same instants as ``held_s``), ``peak_rss_mb`` (the mode's
process) and ``cost_usd`` from :func:`stemset_assets.core.cost.job_cost` at the list prices in
config (``cost:`` section, with the date they were read): GPU seconds at the GPU's price, CPU
core-seconds and memory at theirs. Models: ``tiny`` (a 15 k-parameter hybrid HDemucs with the
release's sources and 7.8 s segments, see benchmarks/memory.py) or ``release`` (the released
htdemucs architecture, random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("baseline", "serial", "pipelined", "handoff")
SEED = 1234


def write_inputs(root: Path, n: int, seconds: float) -> list[str]:
    import numpy as np
    import soundfile as sf

    from benchmarks.common import synthetic_mix

    keys = []
    for k in range(n + 1):  # song 0 is the warm-up (5 s)
        key = f"recordings/song{k}/source.flac"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        length = 5.0 if k == 0 else seconds
        wav = synthetic_mix(length, seed=SEED + k).numpy()
        sf.write(str(path), np.clip(wav, -1, 1).T, 44100, subtype="PCM_16")
        keys.append(key)
    return keys


def child(args) -> dict:
    """One mode in this process; per-song figures without prices (the parent prices them)."""
    import resource

    if args.child == "baseline":  # the code of --baseline-ref, unpacked by the parent
        sys.path.insert(0, args.baseline_root)
        for name in [m for m in sys.modules if m == "gpu_worker" or m.startswith("gpu_worker.")]:
            del sys.modules[name]
    import torch

    from gpu_worker.job import SeparationJob, StorageRef
    from gpu_worker.stores.local import LocalObjectStore
    from gpu_worker.strategy import parse_strategy
    from gpu_worker.worker import run_job

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["STEMSET_STREAM_MIN_SECONDS"] = "1e12"  # songs of a few minutes run in memory, as in production
    st = parse_strategy(
        "bench",
        {"_": args.model_name, "drums": "drums", "bass": "bass", "other": "other", "vocals": "vocals"},
    )
    store = LocalObjectStore(Path(args.root))

    def job(k: int) -> SeparationJob:
        return SeparationJob(
            job_id=f"{args.child}-{k}",
            input_key=f"recordings/song{k}/source.flac",
            output_prefix=f"outputs/{args.child}/song{k}",
            strategy_name="bench",
            strategy=st.to_tree(),
            fingerprint="0" * 16,
            storage=StorageRef("local", root=args.root),
            output_format=args.format,
            bitrate_kbps=192 if args.format in ("m4a", "opus") else None,
            model_repo=args.repo,
            device=args.device,
            seed=SEED,
            gpu_type=args.gpu_type,
        )

    run_job(job(0), store=store, backend="bench")  # warm-up: models, codecs, scipy
    jobs = [job(k) for k in range(1, args.jobs + 1)]
    t0, cpu0 = time.perf_counter(), _cpu()
    cpu_each = []
    if args.child in ("serial", "baseline"):
        results = []
        for j in jobs:
            c0 = _cpu()
            results.append(run_job(j, store=store, backend="bench"))
            cpu_each.append(_cpu() - c0)
    elif args.child == "handoff":
        from gpu_worker.handoff import finish_handoff
        from gpu_worker.pipeline import JobPipeline

        with JobPipeline(prefetch=1, depth=1, finish_workers=args.finish_workers) as pipe:
            futures = [pipe.submit(j, store=store, backend="bench", handoff=True) for j in jobs]
            docs = [f.result() for f in futures]
        results = [finish_handoff(doc, store=store) for doc in docs]
    else:
        from gpu_worker.pipeline import JobPipeline

        with JobPipeline(prefetch=1, depth=1, finish_workers=args.finish_workers) as pipe:
            results = pipe.run_many(jobs, store=store, backend="bench")
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    songs = []
    for k, r in enumerate(results):
        if isinstance(r, Exception):
            raise r
        t = r.timings
        songs.append(
            {
                # Before the pipeline a job held the device for its whole wall time, and its CPU
                # seconds were the process's during it (what "cpu" records now when run alone).
                "held_s": round(t.get("held", t["total"]), 3),
                "separate_s": round(t["separate"], 3),
                "decode_s": round(t["decode"], 3),
                "analyse_s": round(t["analyse"], 3) if "analyse" in t else None,  # baseline: inside encode_s
                "encode_s": round(t["encode"], 3),
                "publish_s": round(t["write"], 3),
                "cpu_core_s": round(t["cpu"] if "cpu" in t else cpu_each[k], 3),
                "latency_s": round(t["total"], 3),
                **({"cpu_function_s": round(t["cpu_function"], 3)} if "cpu_function" in t else {}),
                **({"handoff_s": round(t["handoff"], 3)} if "handoff" in t else {}),
                "handoff_mb": round(4 * 2 * 4 * r.input_duration_s * 44100 / 1e6, 1),
                "peak_rss_mb": round(peak, 1),
            }
        )
    return {
        "mode": args.child,
        "songs": songs,
        "wall_s": round(wall, 2),
        "process_cpu_s": round(cpu, 2),
        "peak_rss_mb": round(peak, 1),
        "threads": torch.get_num_threads(),
    }


def price(mode: dict, gpu_type: str) -> dict:
    """Each song's cost and the mode's means, at the config's list prices."""
    from stemset_assets.config import load_config
    from stemset_assets.core.cost import job_cost, prices_from_config

    config = load_config(None)
    prices = prices_from_config(config.cost, config.gpu)
    songs = mode["songs"]
    for song in songs:
        song["cost_usd"] = job_cost(
            gpu_seconds=song["held_s"],
            cpu_core_seconds=song["cpu_core_s"],
            memory_gib=song["peak_rss_mb"] / 1024,
            backend="bench",
            gpu_type=gpu_type,
            prices=prices,
        )
    n = len(songs)

    def mean(key):
        return round(sum(s[key] for s in songs) / n, 3)

    mode.update(
        held_s=mean("held_s"),
        separate_s=mean("separate_s"),
        held_over_separate=round(sum(s["held_s"] for s in songs) / sum(s["separate_s"] for s in songs), 3),
        cpu_core_s=mean("cpu_core_s"),
        cost_usd=round(sum(s["cost_usd"]["total_usd"] for s in songs) / n, 7),
    )
    return mode


def _cpu() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="length of each song")
    ap.add_argument("--jobs", type=int, default=4, help="songs in the backlog")
    ap.add_argument("--format", default="m4a", choices=["wav", "flac", "opus", "m4a"])
    ap.add_argument("--model", choices=["tiny", "release"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-type", default="A100-40GB", help="the GPU whose price the held seconds are charged at")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--finish-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-root", help=argparse.SUPPRESS)
    ap.add_argument(
        "--baseline-ref", default="8ce9797", help="git revision whose worker is the baseline (before issue 12)"
    )
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from benchmarks.common import machine
    from benchmarks.memory import write_repo

    work = Path(tempfile.mkdtemp(prefix="stemset-jobbench-"))
    try:
        repo, model_name = write_repo(args.model, work / "models")
        write_inputs(work / "store", args.jobs, args.seconds)
        baseline = work / "baseline"
        if "baseline" in args.modes.split(","):
            baseline.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline_ref], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        modes = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--root", str(work / "store"), "--repo", str(repo)]
            cmd += ["--model-name", model_name, "--jobs", str(args.jobs), "--format", args.format]
            cmd += ["--device", args.device, "--gpu-type", args.gpu_type, "--threads", str(args.threads)]
            cmd += ["--finish-workers", str(args.finish_workers), "--seconds", str(args.seconds)]
            cmd += ["--baseline-root", str(baseline)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                sys.stderr.write(out.stderr)
                return out.returncode
            modes[mode] = price(json.loads(out.stdout.strip().splitlines()[-1]), args.gpu_type)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "job",
        "seconds": args.seconds,
        "jobs": args.jobs,
        "format": args.format,
        "model": args.model,
        "device": args.device,
        "gpu_type": args.gpu_type,
        "machine": {**machine(), "cores": os.cpu_count()},
        "modes": modes,
    }
    base = modes.get("baseline") or modes.get("serial")
    for mode in ("pipelined", "handoff"):
        if base and mode in modes:
            m = modes[mode]
            result[f"cpu_core_s_ratio_{base['mode']}_over_{mode}"] = round(
                base["cpu_core_s"] / max(m["cpu_core_s"], 1e-9), 2
            )
            result[f"held_ratio_{base['mode']}_over_{mode}"] = round(base["held_s"] / max(m["held_s"], 1e-9), 2)
            result[f"cost_ratio_{base['mode']}_over_{mode}"] = round(base["cost_usd"] / max(m["cost_usd"], 1e-12), 2)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for mode, m in modes.items():
            print(
                f"{mode:>10}: wall {m['wall_s']} s, held {m['held_s']} s/song, separate {m['separate_s']} s/song, "
                f"held/separate {m['held_over_separate']}, cpu {m['cpu_core_s']} core-s/song, "
                f"peak {m['peak_rss_mb']} MB, ${m['cost_usd']}/song"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory against input length: Stemset's worker (streaming) vs stock Demucs, on the CPU.

    python benchmarks/memory.py --json --minutes 1 10 60 --model tiny
    python benchmarks/memory.py --json --minutes 1 10 --model release

Every (engine, length) runs in a fresh subprocess that reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), so nothing one run allocated counts against the next.
The input is a synthetic music-like mix (``common.synthetic_mix``, one-minute pieces) written once
per length as a 16-bit 44.1 kHz stereo WAV.

Engines:

* ``stemset``: the whole worker, ``gpu_worker.worker.run_job`` with ``STEMSET_STREAM_MIN_SECONDS=0``
  (bounded-memory streaming): copy the input from a local object store, decode, separate,
  encode four 24-bit WAV stems, publish them. Time = the job's ``timings["total"]``.
* ``stemset_memory``: the same job on the in-memory path (``STEMSET_STREAM_MIN_SECONDS`` huge).
* ``demucs``: stock Demucs as its CLI does it: the whole file read into one tensor (soundfile),
  then ``demucs.api.Separator(...).separate_tensor`` on it, stems kept in memory, not written.
  Time = ``separate_tensor`` alone.

Both use shifts=1, overlap=0.25 (Demucs' defaults) on the CPU in float32.

Models (``--model``):

* ``release``: the released htdemucs architecture with random weights (``common.release_htdemucs``,
  41.5 M parameters, 7.8 s segments). About 3.5 s per segment on a 2-core CPU, i.e. ~0.6x real
  time, so an hour of audio takes over half an hour per engine.
* ``tiny``: a tiny hybrid HDemucs (4 channels, depth 3, 15 k parameters) with the release's four
  sources and 7.8 s segment. Segment length, stride, shift padding, transition weights and every
  buffer that scales with the input are the same as the release model's; only the network inside
  one segment is cheaper (its activations are a few MB instead of ~0.7 GB). This measures how
  memory grows with length; ``release`` measures the absolute level.

The whole-input engines (``demucs``, ``stemset_memory``) are skipped for a length whose predicted
peak (linear in length, from the runs before it) would not fit in ``--max-memory-fraction`` of
the memory available now (stock Demucs needs ~17 GB for an hour).
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
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 1234
ENGINES = ("stemset", "stemset_memory", "demucs")
WHOLE_IN_MEMORY = ("stemset_memory", "demucs")  # their peak grows with length: guarded


# ------------------------------------------------------------------------------------------
# Setup (parent process)
# ------------------------------------------------------------------------------------------


def write_repo(kind: str, folder: Path) -> tuple[Path, str]:
    """A Demucs repo folder with the benchmark model; returns (folder, model name)."""
    if kind == "release":
        from benchmarks.common import write_release_repo

        return write_release_repo(folder / "release"), "htdemucs"
    import torch
    import yaml
    from demucs.hdemucs import HDemucs

    from gpu_worker.demo_models import save_model

    folder = folder / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("7e57a11e-*.th")):
        torch.manual_seed(0)
        model = HDemucs(
            sources=["drums", "bass", "other", "vocals"],
            channels=4,
            depth=3,
            nfft=256,
            dconv_depth=1,
            dconv_comp=2,
            segment=Fraction(39, 5),
        ).eval()
        save_model(model, folder, "7e57a11e")
    (folder / "tiny_release_shape.yaml").write_text(yaml.safe_dump({"models": ["7e57a11e"]}))
    return folder, "tiny_release_shape"


def write_input(path: Path, minutes: float) -> None:
    """``minutes`` of synthetic mix as 16-bit WAV, written a minute at a time (bounded memory)."""
    import soundfile as sf

    from benchmarks.common import synthetic_mix

    if path.exists():
        return
    frames = int(round(minutes * 60 * 44100))
    tmp = path.with_suffix(".partial.wav")
    with sf.SoundFile(str(tmp), "w", 44100, 2, subtype="PCM_16") as f:
        k = 0
        while frames > 0:
            block = synthetic_mix(min(60.0, frames / 44100), seed=k).numpy().T
            f.write(block[:frames] * 0.8)
            frames -= block.shape[0]
            k += 1
    tmp.rename(path)


def mem_available_mb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def predict(points: list[tuple[float, float]], minutes: float) -> float:
    """Peak MB at ``minutes``: linear through the first and last measured points, or (one point)
    proportional to length, which overestimates (no fixed base), erring on the safe side."""
    if len(points) == 1:
        m, p = points[0]
        return p * minutes / m
    (m0, p0), (m1, p1) = points[0], points[-1]
    return p1 + (p1 - p0) / max(m1 - m0, 1e-9) * (minutes - m1)


def run_child(engine: str, repo: Path, model: str, wav: Path, work: Path, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--repo",
        str(repo),
        "--model-name",
        model,
        "--input",
        str(wav),
        "--work",
        str(work),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSET_")}
    env["PYTHONPATH"] = str(ROOT)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"engine": engine, "error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return row


# ------------------------------------------------------------------------------------------
# Children
# ------------------------------------------------------------------------------------------


def child(args) -> dict:
    import torch

    from gpu_worker.process_memory import peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = None
    if args.child == "demucs":
        import random

        import soundfile as sf
        from demucs.api import Separator

        data, sr = sf.read(str(args.input), dtype="float32", always_2d=True)
        wav = torch.from_numpy(data.T.copy())
        del data
        seconds = wav.shape[1] / sr
        sep = Separator(model=args.model_name, repo=args.repo, device="cpu", shifts=1, overlap=0.25, progress=False)
        random.seed(SEED)
        t0 = time.perf_counter()
        _, stems = sep.separate_tensor(wav)
        wall = time.perf_counter() - t0
        extra = {"stems": len(stems)}
    else:
        from gpu_worker.job import SeparationJob, StorageRef
        from gpu_worker.strategy import parse_strategy
        from gpu_worker.worker import run_job

        os.environ["STEMSET_STREAM_MIN_SECONDS"] = "0" if args.child == "stemset" else "1e12"
        st = parse_strategy(
            "bench",
            {
                "_": args.model_name,
                "drums": "drums",
                "bass": "bass",
                "other": "other",
                "vocals": "vocals",
                "__params": {"shifts": 1, "overlap": 0.25},
            },
        )
        out = Path(args.work) / f"out-{os.getpid()}"
        job = SeparationJob(
            job_id=f"mem{os.getpid()}",
            input_key=Path(args.input).name,
            output_prefix="stems",
            strategy_name="bench",
            strategy=st.to_tree(),
            fingerprint="0" * 16,
            storage=StorageRef("local", root=str(Path(args.input).parent)),
            output_storage=StorageRef("local", root=str(out)),
            output_format="wav",
            bitrate_kbps=None,
            model_repo=str(args.repo),
            device="cpu",
            seed=SEED,
        )
        result = run_job(job)
        shutil.rmtree(out, ignore_errors=True)
        seconds = result.input_duration_s
        wall = result.timings["total"]
        extra = {
            "separate_s": round(result.timings["separate"], 2),
            "segments": result.segments,
            "residual_db": result.residual_db,
        }
    return {
        "engine": args.child,
        "audio_s": round(seconds, 2),
        "wall_s": round(wall, 2),
        "rtf": round(seconds / wall, 3),
        "peak_rss_mb": round(peak_rss_mb()),
        "threads": torch.get_num_threads(),
        **extra,
    }


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    ap.add_argument("--model", choices=["release", "tiny"], default="tiny")
    ap.add_argument("--engines", default="stemset,demucs", help=f"comma-separated, of {','.join(ENGINES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    ap.add_argument(
        "--max-memory-fraction",
        type=float,
        default=0.75,
        help="skip a whole-input engine (demucs, stemset_memory) where its predicted peak exceeds "
        "this share of the memory available now",
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stemset-memory-bench")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return 0

    from benchmarks.common import machine

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engine(s) {unknown}")
    args.work.mkdir(parents=True, exist_ok=True)
    repo, name = write_repo(args.model, args.work / "models")
    rows = []
    points: dict[str, list[tuple[float, float]]] = {}  # engine -> (minutes, peak MB), to predict the next
    for minutes in args.minutes:
        wav = args.work / f"mix-{minutes:g}min.wav"
        write_input(wav, minutes)
        for engine in engines:
            if engine in WHOLE_IN_MEMORY and points.get(engine):
                predicted = predict(points[engine], minutes)
                if predicted > args.max_memory_fraction * mem_available_mb():
                    row = {
                        "engine": engine,
                        "minutes": minutes,
                        "skipped": f"predicted peak {predicted:.0f} MB "
                        f"> {args.max_memory_fraction:.0%} of {mem_available_mb():.0f} MB available",
                    }
                    rows.append(row)
                    print(json.dumps(row) if args.json else row, file=sys.stderr, flush=True)
                    continue
            row = {
                "model": args.model,
                "minutes": minutes,
                **run_child(engine, repo, name, wav, args.work, args.threads),
            }
            if "peak_rss_mb" in row:
                points.setdefault(engine, []).append((minutes, row["peak_rss_mb"]))
            rows.append(row)
            print(json.dumps(row) if args.json else row, file=sys.stderr, flush=True)
    result = {"model": args.model, "rows": rows, "machine": machine(), "nproc": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'engine':>15} {'minutes':>8} {'peak RSS MB':>12} {'wall s':>9} {'x realtime':>10}")
        for r in rows:
            if "skipped" in r or "error" in r:
                print(f"{r['engine']:>15} {r['minutes']:>8g} {r.get('skipped') or r.get('error')}")
            else:
                print(f"{r['engine']:>15} {r['minutes']:>8g} {r['peak_rss_mb']:>12} {r['wall_s']:>9} {r['rtf']:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One-shot GPU benchmark: stock Demucs against Stemset's engine, fp32 and bf16, several batch sizes.

    python benchmarks/gpu_suite.py --seconds 240 --batch-sizes 1,4,8,16,32 --out results.json

Runs the release htdemucs architecture (random weights) on a synthetic 4-minute mix. Prints a
table of times real time, ms per segment, peak GPU memory and error against Demucs in fp32, plus
the GPU cost of one 4-minute song at the config's prices (timed on this card; slower cards cost
proportionally more time, so the A100/L4/T4 columns are lower bounds at those prices).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, synthetic_mix, write_release_repo  # noqa: E402
from gpu_worker import models  # noqa: E402
from gpu_worker.engine import separate  # noqa: E402
from gpu_worker.inference import EngineStats  # noqa: E402
from gpu_worker.strategy import SeparationParams  # noqa: E402

PRICES = {"A100-40GB": 2.50, "L4": 0.70, "T4": 0.59, "H100": 4.00}
SEED = 1234


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.empty_cache()


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    repo = write_release_repo(Path(tempfile.gettempdir()) / "stemset-release-htdemucs")
    wav = synthetic_mix(args.seconds)
    rows = []

    from demucs.api import Separator

    sep = Separator(model="htdemucs", repo=repo, device=str(device), shifts=1, overlap=0.25, progress=False)

    def stock():
        random.seed(SEED)
        return sep.separate_tensor(wav)[1]

    random.seed(SEED)
    sep.separate_tensor(synthetic_mix(10.0, seed=1))  # warm-up
    _reset_peak(device)
    stock_s, ref = timed(stock, device, args.repeats)
    ref = {k: v.float().cpu() for k, v in ref.items()}
    n_seg = None
    rows.append(
        {"engine": "demucs", "precision": "fp32", "batch": 1, "s": stock_s, "gpu_mem_mb": _peak_mb(device), "err": 0.0}
    )

    model = models.load_model("htdemucs", repo)
    for precision in args.precisions.split(","):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            params = SeparationParams(shifts=1, precision=precision, batch_size=bs)
            stats = EngineStats()

            def ours():
                return separate(model, wav, params, device, rng=random.Random(SEED), stats=stats)

            try:
                separate(model, synthetic_mix(10.0, seed=1), params, device)  # warm-up this shape
                _reset_peak(device)
                s, out = timed(ours, device, args.repeats)
            except torch.OutOfMemoryError:
                rows.append({"engine": "stemset", "precision": precision, "batch": bs, "s": None, "oom": True})
                _reset_peak(device)
                continue
            n_seg = stats.segments // args.repeats
            err = max(((out[k].float().cpu() - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
            rows.append(
                {
                    "engine": "stemset",
                    "precision": precision,
                    "batch": bs,
                    "s": s,
                    "gpu_mem_mb": _peak_mb(device),
                    "err": err,
                    "segments": n_seg,
                }
            )
            del out

    song_s = 240.0
    print(f"\n{machine()}  input {args.seconds:.0f} s, shifts=1, overlap=0.25, median of {args.repeats}")
    head = (
        f"{'engine':8} {'prec':5} {'batch':>5} {'x realtime':>10} {'ms/seg':>7} {'speedup':>7} {'GPU MiB':>8} {'err vs fp32':>11} "
        + " ".join(f"{'$/song ' + g:>13}" for g in PRICES)
    )
    print(head)
    for r in rows:
        if r.get("oom"):
            print(f"{r['engine']:8} {r['precision']:5} {r['batch']:>5} {'OOM':>10}")
            continue
        segs = r.get("segments") or n_seg or 1
        per_song = r["s"] * song_s / args.seconds
        r.update(
            {
                "x_realtime": args.seconds / r["s"],
                "ms_per_segment": 1000 * r["s"] / segs,
                "speedup_vs_demucs": stock_s / r["s"],
                "usd_per_4min_song": {g: per_song * p / 3600 for g, p in PRICES.items()},
            }
        )
        print(
            f"{r['engine']:8} {r['precision']:5} {r['batch']:>5} {r['x_realtime']:>10.1f} {r['ms_per_segment']:>7.2f} "
            f"{r['speedup_vs_demucs']:>7.2f} {r['gpu_mem_mb']:>8.0f} {r['err']:>11.2e} "
            + " ".join(f"{r['usd_per_4min_song'][g]:>13.5f}" for g in PRICES)
        )
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "seconds": args.seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

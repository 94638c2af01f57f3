"""Where the GPU time goes: model forward alone vs the whole engine, and a profiler table.

python benchmarks/gpu_profile.py --seconds 240 --batch-size 64 --precision bf16
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import synthetic_mix, write_release_repo  # noqa: E402
from gpu_worker import models  # noqa: E402
from gpu_worker.engine import separate  # noqa: E402
from gpu_worker.inference import EngineStats, autocast  # noqa: E402
from gpu_worker.strategy import SeparationParams  # noqa: E402


def bench(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    dev = torch.device("cuda")
    repo = write_release_repo(Path(tempfile.gettempdir()) / "stemset-release-htdemucs")
    model = models.load_model("htdemucs", repo)
    sub = model.models[0].to(dev)
    params = SeparationParams(shifts=1, precision=args.precision, batch_size=args.batch_size)
    separate(model, synthetic_mix(10), params, dev)  # patches + warm
    seg = int(7.8 * 44100)
    for b in (1, 8, 16, 41, 64):
        x = torch.randn(b, 2, seg, device=dev)

        def fwd():
            with torch.inference_mode(), autocast(dev, args.precision):
                return sub(x)

        t = bench(fwd, 3)
        print(f"forward only  batch {b:3d}: {t * 1000:8.1f} ms  {t * 1000 / b:6.2f} ms/segment")
    wav = synthetic_mix(args.seconds)
    stats = EngineStats()
    t = bench(lambda: separate(model, wav, params, dev, rng=random.Random(1), stats=stats), 3)
    print(
        f"whole engine {args.seconds:.0f}s: {t * 1000:8.1f} ms  ({args.seconds / t:.1f}x realtime, {stats.segments // 4} segments)"
    )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        separate(model, wav, params, dev, rng=random.Random(1))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

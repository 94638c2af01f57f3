"""Per-song cost of Option B (cores beside the GPU + the pipeline) and Option A (stems handed to a
CPU-only function) on Modal, from measured CPU seconds and a GPU separation time.

    python benchmarks/cost_model.py --json
    python benchmarks/cost_model.py --separate-s 0.71 --cpu-core-s 18.2 --stem-encode-s 4.25

Defaults: a 4-minute song, htdemucs to m4a. ``--cpu-core-s`` (decode, one-pass analysis, AAC
encoding, publishing) and ``--stem-encode-s`` (one stem's AAC encode, the longest serial piece)
were measured on the CPU (benchmarks/RESULTS.md, "Whole-job cost"); ``--separate-s`` is projected
for an A100 (the H100 measured 0.36 s in bf16 at batch 64; an A100 taken as half as fast), since
no GPU was lent. Prices are the config's (``gpu.prices_per_hour``, ``cost.*``). A Modal physical
core is counted as one measured core-second (it has two hyperthreads: conservative).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def model(args) -> dict:
    from stemset_assets.config import load_config

    config = load_config(None)
    gpu = config.gpu.price_per_hour(args.gpu_type)
    cpu, mem = config.cost.cpu_per_core_hour, config.cost.memory_per_gib_hour
    sep, work, stem = args.separate_s, args.cpu_core_s, args.stem_encode_s
    alone_extra = args.decode_s + stem  # alone: decode, separate, then the stems encode in parallel
    out: dict = {"inputs": vars(args), "prices": {"gpu": gpu, "cpu": cpu, "memory": mem}, "B": [], "A": []}
    for n in args.cores:
        held = max(sep, work / n)
        rate = gpu + n * cpu + args.memory_gib * mem
        out["B"].append(
            {
                "cores": n,
                "held_s": round(held, 2),
                "usd_backlog": round(held * rate / 3600, 5),
                "usd_alone": round((sep + alone_extra) * rate / 3600, 5),
            }
        )
    handoff_mb = 4 * 2 * 4 * 44100 * args.seconds / 1e6
    for bw in args.bandwidth_mb_s:
        xfer = handoff_mb / bw
        rate = gpu + args.a_gpu_cores * cpu + args.a_gpu_memory_gib * mem
        fn_wall = xfer + stem + 0.2
        fn = max(args.a_fn_cores * fn_wall, work) * cpu / 3600 + args.a_fn_memory_gib * fn_wall * mem / 3600
        held = max(sep, xfer)
        out["A"].append(
            {
                "bandwidth_mb_s": bw,
                "held_s": round(held, 2),
                "usd_backlog": round(held * rate / 3600 + fn, 5),
                "usd_alone": round((args.decode_s + sep + xfer) * rate / 3600 + fn, 5),
            }
        )
    before = args.decode_s + sep + 4 * args.loudness_before_s + 4 * stem + 0.3
    out["before"] = {"held_s": round(before, 1), "usd": round(before * (gpu + cpu) / 3600, 5)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--gpu-type", default="A100-40GB")
    ap.add_argument("--separate-s", type=float, default=0.71)
    ap.add_argument("--cpu-core-s", type=float, default=18.2)
    ap.add_argument("--stem-encode-s", type=float, default=4.25)
    ap.add_argument("--decode-s", type=float, default=0.5)
    ap.add_argument("--loudness-before-s", type=float, default=0.93, help="pyloudnorm and peaks, per stem")
    ap.add_argument("--memory-gib", type=float, default=16.0)
    ap.add_argument("--cores", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--bandwidth-mb-s", type=float, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--a-gpu-cores", type=float, default=4)
    ap.add_argument("--a-gpu-memory-gib", type=float, default=8)
    ap.add_argument("--a-fn-cores", type=float, default=4)
    ap.add_argument("--a-fn-memory-gib", type=float, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = model(args)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for row in out["B"]:
            print(f"B {row}")
        for row in out["A"]:
            print(f"A {row}")
        print(f"before {out['before']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What each of the CPU path's module swaps is worth inside a forward of the release htdemucs.

    python benchmarks/cpu_fusions.py --json
    python benchmarks/cpu_fusions.py --json --pairs 12 --swaps phase_conv_transpose,fused_dconv

For each swap, two copies of the model are prepared in one process: one with everything
``prepare_for_cpu`` does, one with everything but that swap. Forwards of one 7.8 s segment then
alternate between the two (ABBA order), so that drifts of the host's speed fall on both alike;
the figure is the median of the pairs' time ratios (``all / without``, under 1 where the swap
pays). Whole-process runs on a shared 2-vCPU guest moved by more than these swaps are worth;
alternating forwards in one process resolve about 0.5%. ``max_rel_err`` compares the two
copies' outputs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_worker.cpu_threads import prefer_passive_openmp  # noqa: E402

prefer_passive_openmp()  # as `stemset separate` does: before torch loads

import torch  # noqa: E402

from benchmarks.common import emit, machine, synthetic_mix, write_release_repo  # noqa: E402

# the swaps worth measuring alone: the attention and the packed linears are what the others build on
SWAPS = ["phase_conv_transpose", "fused_dconv", "feed_forward_gelu", "residual_branches"]


def compare(base, mix: torch.Tensor, swap: str, pairs: int) -> dict:
    from gpu_worker.cpu_inference import prepare_for_cpu

    full, without = copy.deepcopy(base), copy.deepcopy(base)
    prepare_for_cpu(full)
    prepare_for_cpu(without, without=swap)
    times: dict[str, list[float]] = {"all": [], "without": []}
    with torch.inference_mode():
        a, b = full(mix), without(mix)  # warm-up, and the outputs to compare
        err = float((a - b).abs().max() / b.abs().max())
        for i in range(pairs):
            order = ("all", "without") if i % 2 == 0 else ("without", "all")
            for name in order:
                model = full if name == "all" else without
                t0 = time.perf_counter()
                model(mix)
                times[name].append(time.perf_counter() - t0)
    ratios = [x / y for x, y in zip(times["all"], times["without"], strict=True)]
    return {
        "forward_s_all": round(statistics.median(times["all"]), 4),
        "forward_s_without": round(statistics.median(times["without"]), 4),
        "ratio_all_over_without": round(statistics.median(ratios), 4),
        "max_rel_err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--swaps", default=",".join(SWAPS))
    parser.add_argument("--repo", type=Path, help="a release-size model repo (built in a temporary folder if absent)")
    args = parser.parse_args()

    from gpu_worker import models
    from gpu_worker.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo or write_release_repo(Path(tmp) / "repo")
        base = models.load_model("htdemucs", repo).models[0]
        mix = synthetic_mix(7.8)[None]
        mix = (mix - mix.mean()) / mix.std()
        result = {"pairs": args.pairs, **machine()}
        for swap in args.swaps.split(","):
            if swap not in SWAPS:
                raise SystemExit(f"unknown swap {swap!r}; choose from {', '.join(SWAPS)}")
            result[swap] = compare(base, mix, swap, args.pairs)
    emit(result, args.json)


if __name__ == "__main__":
    main()

"""Start-up of the `stemset` command: `stemset --help`, and `stemset separate` to its first segment.

    python benchmarks/startup.py --json --runs 3

`help_s`: wall seconds of `python -m stemset_assets.cli --help` (and of `separate --help`).
`first_segment_s`: from starting `stemset separate --device cpu` on a short WAV to its progress
bar's first move, i.e. the first separated segment (the command runs as itself, with its bar
noting the time); `total_s` to the process' end. Release-size htdemucs, random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli_vs_demucs import CONFIG  # noqa: E402
from benchmarks.common import emit, synthetic_mix, write_release_repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARK_ENV = "STEMSET_BENCH_FIRST_SEGMENT_FILE"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_segment(cmd: list[str], env: dict[str, str], mark: Path) -> tuple[float, float]:
    """Seconds from starting ``cmd`` to its first separated segment, and to its end."""
    mark.unlink(missing_ok=True)
    t0 = time.time()
    subprocess.run(cmd, env={**env, MARK_ENV: str(mark)}, check=True, stdout=subprocess.DEVNULL)
    total = time.time() - t0
    return float(mark.read_text()) - t0, total


def child(argv: list[str]) -> int:
    """`stemset` itself, with its progress bar noting when it first moves (the first segment)."""
    from stemset_assets.cli import main as cli_main
    from stemset_assets.cli import separate

    mark = Path(os.environ[MARK_ENV])

    class Bar(separate.tqdm):
        def update(self, n=1):
            if n and not mark.exists():
                mark.write_text(repr(time.time()))
            return super().update(n)

    separate.tqdm = Bar
    return cli_main.main(argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the input to separate")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repo", default=str(Path(tempfile.gettempdir()) / "stemset-release-repo"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    repo = write_release_repo(Path(args.repo))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    cli = [sys.executable, "-m", "stemset_assets.cli"]
    with tempfile.TemporaryDirectory(prefix="stemset-startup-") as tmp_name:
        tmp = Path(tmp_name)
        wav = tmp / "mix.wav"
        sf.write(wav, synthetic_mix(args.seconds).numpy().T, 44100, subtype="PCM_16")
        config = tmp / "config.yaml"
        config.write_text(CONFIG.format(repo=repo, fmt="wav"))
        sep = [sys.executable, __file__, "--child", "--config", str(config), "separate", "--device", "cpu"]
        sep += ["--out", str(tmp / "out"), str(wav)]
        help_s = [timed(cli + ["--help"], env) for _ in range(args.runs)]
        sep_help_s = [timed(cli + ["separate", "--help"], env) for _ in range(args.runs)]
        runs = [first_segment(sep, env, tmp / "first") for _ in range(args.runs)]
    emit(
        {
            "help_s": round(statistics.median(help_s), 3),
            "separate_help_s": round(statistics.median(sep_help_s), 3),
            "first_segment_s": round(statistics.median(r[0] for r in runs), 2),
            "total_s": round(statistics.median(r[1] for r in runs), 2),
            "input_s": args.seconds,
            "runs": args.runs,
            "load_average_1m": os.getloadavg()[0],
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`stemset separate FILE...`: separate local files into a folder, without Dagster or a bucket."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from gpu_worker.audio.source import MIN_FRACTION_ENV
from gpu_worker.cpu_threads import prefer_passive_openmp
from gpu_worker.errors import StemsetError
from gpu_worker.job import SeparationJob, StorageRef

from ..config import StemsetConfig, load_config
from ..core.stemsets import model_repo, strategy_fingerprint
from .common import existing_file


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files to separate")
    p.add_argument(
        "--strategy",
        "-s",
        default=None,
        help="strategy name from config.yaml (default: the first strategy of the first profile)",
    )
    p.add_argument("--out", "-o", type=Path, default=Path("separated"), help="output folder (default ./separated)")
    p.add_argument("--format", "-f", choices=["wav", "flac", "opus", "m4a"], default="wav")
    p.add_argument("--bitrate", type=int, default=192, help="kbit/s for opus and m4a (default 192)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--accept-truncated",
        action="store_true",
        help="separate what a cut file holds instead of failing (sets STEMSET_MIN_DECODED_FRACTION=0)",
    )


def run(args: argparse.Namespace) -> int:
    """Separate local files into DIR/<file stem>/<stem>.<ext> plus manifest.json. No Dagster involved."""
    prefer_passive_openmp()  # before torch loads (in run_job): no spinning threads on shared cores
    from gpu_worker.worker import run_job  # lazy: numpy, the audio stack and torch come with it

    config = load_config(args.config)
    if args.accept_truncated:
        os.environ[MIN_FRACTION_ENV] = "0"  # this process only: decoding reads it
    name = args.strategy or _default_strategy(config)
    strategy = config.strategy(name)
    repo = model_repo(config)
    fp = strategy_fingerprint(strategy, repo)
    files = [existing_file(f) for f in args.files]
    out = args.out.expanduser().absolute()
    failures = 0
    for path in files:
        job = SeparationJob(
            job_id=uuid.uuid4().hex[:12],
            input_key=path.name,
            output_prefix=_folder_name(path),
            set_folder=False,  # a plain folder: <out>/<file>/<stem>.<ext>
            strategy_name=name,
            strategy=strategy.to_tree(),
            fingerprint=fp,
            storage=StorageRef("local", root=str(path.parent)),
            output_storage=StorageRef("local", root=str(out)),
            output_format=args.format,
            bitrate_kbps=args.bitrate,
            model_repo=repo,
            device=args.device,
        )
        with tqdm(
            total=100,
            desc=path.name[:30],
            unit="%",
            bar_format="{desc:30} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
            disable=None if not args.quiet else True,
        ) as bar:

            def advance(fraction: float) -> None:
                bar.update(round(fraction * 100) - bar.n)

            try:
                result = run_job(job, progress=advance)
            except StemsetError as err:
                if len(files) == 1 or args.debug:
                    raise
                bar.close()
                print(f"error: {path}: {err}", file=sys.stderr)
                failures += 1
                continue
        folder = out / job.output_prefix
        stems = ", ".join(result.stems)
        print(
            f"{path.name}: {len(result.stems)} stems ({stems}) in {folder} "
            f"[{result.input_duration_s:.1f} s audio, {result.timings['total']:.1f} s on {result.device}]"
        )
    if failures:
        print(f"{failures} of {len(files)} file(s) failed; see the errors above.", file=sys.stderr)
        return 1
    return 0


def _default_strategy(config: StemsetConfig) -> str:
    for profile in config.profiles.values():
        if profile.strategies:
            return profile.strategies[0]
    return next(iter(config.strategies))


def _folder_name(path: Path) -> str:
    """The output folder for an input: its file name without extension, made safe as a path part."""
    stem = path.stem.strip().replace(os.sep, "_") or "audio"
    return stem if stem not in (".", "..") else "audio"

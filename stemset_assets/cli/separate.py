"""`stemset separate FILE...`: separate local files into a folder, without Dagster or a bucket.

One file runs its stages one after another (:func:`gpu_worker.worker.run_job`); several go through
the workers' job pipeline (:class:`gpu_worker.pipeline.JobPipeline`), so the device separates the
next file while the last one's stems are encoded and written.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from gpu_worker.cpu_threads import prefer_passive_openmp
from gpu_worker.errors import StemsetError
from gpu_worker.job import AAC_CODERS, SeparationJob, StorageRef

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
    p.add_argument(
        "--aac-coder",
        choices=AAC_CODERS,
        default=None,
        help="FFmpeg's AAC quantiser search for m4a (default: fast; twoloop uses about 2.7x the CPU)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--accept-truncated",
        action="store_true",
        help="separate what a cut file holds instead of failing (sets STEMSET_MIN_DECODED_FRACTION=0)",
    )


def run(args: argparse.Namespace) -> int:
    """Separate local files into DIR/<file stem>/<stem>.<ext> plus manifest.json. No Dagster involved."""
    prefer_passive_openmp()  # before torch loads (in run_job): no spinning threads on shared cores
    config = load_config(args.config)
    if args.accept_truncated:
        from gpu_worker.audio.source import MIN_FRACTION_ENV  # here: PyAV and soundfile would slow every command

        os.environ[MIN_FRACTION_ENV] = "0"  # this process only: decoding reads it
    name = args.strategy or _default_strategy(config)
    strategy = config.strategy(name)
    repo = model_repo(config)
    fp = strategy_fingerprint(strategy, repo)
    files = list(dict.fromkeys(existing_file(f) for f in args.files))  # the same file twice runs once
    _check_folders(files)
    out = args.out.expanduser().absolute()
    jobs = [
        SeparationJob(
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
            aac_coder=args.aac_coder,
        )
        for path in files
    ]
    if len(jobs) == 1:
        return _run_one(jobs[0], files[0], out, args)
    return _run_pipelined(jobs, files, out, args)


def _run_one(job: SeparationJob, path: Path, out: Path, args: argparse.Namespace) -> int:
    """One file: its stages one after another; an error propagates (one paragraph from main)."""
    from gpu_worker.worker import run_job  # lazy: numpy, the audio stack and torch come with it

    with _bar(path, 0, args) as bar:

        def advance(fraction: float) -> None:
            bar.update(round(fraction * 100) - bar.n)

        result = run_job(job, progress=advance)
    print(_summary(path, out, job, result))
    return 0


# What a file's bar shows after each stage mark of the job pipeline (gpu_worker.stages).
_STAGES = {
    "fetch_start": "decoding",
    "fetch_end": "waiting for the device",
    "separate_start": "separating",
    "separate_end": "waiting to encode",
    "finish_start": "encoding",
    "encode_start": "encoding",
    "encode_end": "writing",
    "finish_end": "done",
}


def _run_pipelined(jobs: list[SeparationJob], files: list[Path], out: Path, args: argparse.Namespace) -> int:
    """Several files through the workers' job pipeline: the device separates file k+1 while
    file k's stems are measured, encoded and written. A file that fails is reported and the
    others go on; exit status 1 if any failed."""
    from gpu_worker.pipeline import JobPipeline  # lazy: numpy, the audio stack and torch come with it

    bars = {job.job_id: _bar(path, i, args) for i, (job, path) in enumerate(zip(jobs, files, strict=True))}
    for bar in bars.values():
        bar.set_postfix_str("queued", refresh=False)

    def observe(job_id: str, mark: str, _when: float) -> None:
        bar = bars[job_id]
        if mark == "fetch_start":
            bar.reset(total=100)  # the clock shows this file's own time, not the queue's
        if mark in _STAGES:
            bar.set_postfix_str(_STAGES[mark])

    def progress_of(bar):
        return lambda fraction: bar.update(round(fraction * 100) - bar.n)

    pipe = JobPipeline(observer=observe)
    failures: list[tuple[Path, BaseException]] = []
    futures = []
    try:
        futures = [pipe.submit(job, progress=progress_of(bars[job.job_id])) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):  # a bar says "failed" as soon as it is
            future.add_done_callback(_mark_failed(bars[job.job_id]))
        for job, path, future in zip(jobs, files, futures, strict=True):
            err = future.exception()
            if err is None:
                tqdm.write(_summary(path, out, job, future.result()), file=sys.stdout)
                continue
            failures.append((path, err))
            what = str(err) if isinstance(err, StemsetError) else f"unexpected {type(err).__name__}: {err}"
            tqdm.write(f"error: {path}: {what}", file=sys.stderr)
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()  # queued files never start; the pipeline's threads end with the process
        raise
    pipe.close()
    for bar in bars.values():
        bar.close()
    if failures:
        print(f"{len(failures)} of {len(files)} file(s) failed; see the errors above.", file=sys.stderr)
        first = failures[0][1]
        if args.debug or not isinstance(first, StemsetError):
            raise first  # the traceback (main prints an unexpected error as one line without --debug)
        return 1
    return 0


def _mark_failed(bar: tqdm):
    def done(future) -> None:
        if not future.cancelled() and future.exception() is not None:
            bar.set_postfix_str("failed")

    return done


def _bar(path: Path, position: int, args: argparse.Namespace) -> tqdm:
    return tqdm(
        total=100,
        desc=path.name[:30],
        unit="%",
        position=position,
        bar_format="{desc:30} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
        disable=None if not args.quiet else True,
    )


def _summary(path: Path, out: Path, job: SeparationJob, result) -> str:
    stems = ", ".join(result.stems)
    return (
        f"{path.name}: {len(result.stems)} stems ({stems}) in {out / job.output_prefix} "
        f"[{result.input_duration_s:.1f} s audio, {result.timings['total']:.1f} s on {result.device}]"
    )


def _check_folders(files: list[Path]) -> None:
    """Two inputs that would write into the same output folder are refused before any work."""
    seen: dict[str, Path] = {}
    for path in files:
        folder = _folder_name(path)
        if folder in seen:
            raise StemsetError(
                f"{seen[folder]} and {path} would both be written to the folder {folder!r}.",
                "Rename one of them, or separate them in two runs with different --out folders.",
            )
        seen[folder] = path


def _default_strategy(config: StemsetConfig) -> str:
    for profile in config.profiles.values():
        if profile.strategies:
            return profile.strategies[0]
    return next(iter(config.strategies))


def _folder_name(path: Path) -> str:
    """The output folder for an input: its file name without extension, made safe as a path part."""
    stem = path.stem.strip().replace(os.sep, "_") or "audio"
    return stem if stem not in (".", "..") else "audio"

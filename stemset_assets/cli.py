"""The `stemset` command line.

Each subcommand is a function registered in ``COMMANDS``; Dagster, torch and Demucs are imported
only inside the commands that need them, so `stemset --help` and `stemset separate` start fast.
Errors a user can act on print as one paragraph (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Callable

from gpu_worker.errors import StemsetError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_args, run)
        return run

    return register


def _separate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files to separate")
    p.add_argument("--strategy", "-s", default=None,
                   help="strategy name from config.yaml (default: the first strategy of the first profile)")
    p.add_argument("--out", "-o", type=Path, default=Path("separated"), help="output folder (default ./separated)")
    p.add_argument("--format", "-f", choices=["wav", "flac", "opus", "m4a"], default="wav")
    p.add_argument("--bitrate", type=int, default=192, help="kbit/s for opus and m4a (default 192)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


@command("separate", _separate_args)
def cmd_separate(args: argparse.Namespace) -> int:
    """Separate local files into DIR/<file stem>/<stem>.<ext> plus manifest.json. No Dagster involved."""
    from tqdm import tqdm

    from gpu_worker.job import SeparationJob, StorageRef
    from gpu_worker.models import model_identity
    from gpu_worker.strategy import fingerprint
    from gpu_worker.worker import run_job

    from .config import load_config

    config = load_config(args.config)
    name = args.strategy or _default_strategy(config)
    strategy = config.strategy(name)
    repo = str(config.models.repo) if config.models.repo else None
    fp = fingerprint(strategy, {m: model_identity(m, repo) for m in strategy.models})
    files = [_existing_file(f) for f in args.files]
    out = args.out.expanduser().absolute()
    failures = 0
    for path in files:
        job = SeparationJob(
            job_id=uuid.uuid4().hex[:12], input_key=path.name, output_prefix=_folder_name(path),
            strategy_name=name, strategy=strategy.to_tree(), fingerprint=fp,
            storage=StorageRef("local", root=str(path.parent)), output_storage=StorageRef("local", root=str(out)),
            output_format=args.format, bitrate_kbps=args.bitrate, model_repo=repo, device=args.device,
        )
        with tqdm(total=100, desc=path.name[:30], unit="%", bar_format="{desc:30} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
                  disable=None if not args.quiet else True) as bar:
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
        print(f"{path.name}: {len(result.stems)} stems ({stems}) in {folder} "
              f"[{result.input_duration_s:.1f} s audio, {result.timings['total']:.1f} s on {result.device}]")
    if failures:
        print(f"{failures} of {len(files)} file(s) failed; see the errors above.", file=sys.stderr)
        return 1
    return 0


def _default_strategy(config) -> str:
    for profile in config.profiles.values():
        if profile.strategies:
            return profile.strategies[0]
    return next(iter(config.strategies))


def _existing_file(path: Path) -> Path:
    path = path.expanduser().absolute()
    if not path.is_file():
        raise StemsetError(f"{path} does not exist or is not a file.", "Check the path and try again.")
    return path


def _folder_name(path: Path) -> str:
    """The output folder for an input: its file name without extension, made safe as a path part."""
    stem = path.stem.strip().replace(os.sep, "_") or "audio"
    return stem if stem not in (".", "..") else "audio"


def _common_args(p: argparse.ArgumentParser, default=None) -> None:
    # Given to the main parser and to every subcommand, so they work before or after it
    # (a subcommand that defines one of them itself keeps its own).
    flag = default if default is not None else False
    options = [
        (("--config", "-c"), {"default": default,
                              "help": "config file (default: $STEMSET_CONFIG, else ./config.yaml, else built-in defaults)"}),
        (("--debug",), {"action": "store_true", "default": flag, "help": "show tracebacks"}),
        (("--quiet", "-q"), {"action": "store_true", "default": flag, "help": "no progress bars"}),
    ]
    for names, kwargs in options:
        if not any(name in p._option_string_actions for name in names):
            p.add_argument(*names, **kwargs)


def _register_plugins() -> None:
    from gpu_worker.http_worker import add_worker_args, run_worker

    if "worker" not in COMMANDS:
        command("worker", add_worker_args)(run_worker)
    if "api" not in COMMANDS:
        from . import cli_process

        cli_process.register()
    from . import cli_automation  # noqa: F401  (importing it registers `status` and `backfill`)


def _with_nested(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-subcommand parser below it (``api serve``, ``worker serve``)."""
    out = [parser]
    for action in parser._actions:  # argparse offers no public walk over subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += _with_nested(child)
    return out


def build_parser() -> argparse.ArgumentParser:
    _register_plugins()
    parser = argparse.ArgumentParser(
        prog="stemset",
        description="Separate band recordings into stems with Demucs and keep them in a Dagster catalog.",
    )
    _common_args(parser)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip()
        sub = subs.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc or None)
        add_args(sub)
        for parser_ in _with_nested(sub):  # `stemset api serve --debug` works as well as `stemset --debug api serve`
            _common_args(parser_, default=argparse.SUPPRESS)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except StemsetError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - last resort: one line, traceback behind --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {err}. Run again with --debug for the traceback "
              "and report it if it persists.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

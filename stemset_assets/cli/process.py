"""`stemset process PROFILE [FILE...]`: the product without the Dagster UI.

Uploads files to a profile's inputs (or takes every input that is not current), runs them
through Dagster, in this process against the configured instance
(:func:`~stemset_assets.defs.runs.dagster_instance`) or through a running webserver when
``dagster.webserver_url`` is set, then downloads the stems and prints a summary.

The terminal shows progress, the summary table and one result line (failures one line each).
Dagster's own output (its run logs, warnings, stack traces) goes to a log file under
``$DAGSTER_HOME/logs/`` whose path is printed; ``--verbose`` shows it on the terminal instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from gpu_worker.errors import StemsetError

from ..config import load_config
from ..core.cost import total_cost_usd
from ..core.layout import download_stems, read_manifest
from ..core.partition_keys import assign_partition_keys, list_inputs
from ..core.state import TO_REDO
from ..core.uploads import UploadRejected, check_audio_file
from .common import existing_file, format_table


@dataclass
class Row:
    """One line of the summary: a file (partition) x strategy."""

    file: str
    partition: str
    strategy: str
    ok: bool
    stems: str = ""
    seconds: float = 0.0
    cost: float = 0.0
    error: str | None = None
    folder: Path | None = None


# --------------------------------------------------------------------------- process


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", metavar="PROFILE", help="profile from config.yaml (e.g. h4n)")
    p.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="audio files to upload and process (none: every input of the profile that is not current)",
    )
    p.add_argument(
        "--strategy",
        "-s",
        action="append",
        default=None,
        metavar="S",
        help="strategy to run (repeatable; default: the profile's strategies)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="separate in this process with the local separator (ignores gpu.backend and the webserver)",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Dagster's logs on the terminal (default: in a log file, whose path is printed)",
    )
    p.add_argument(
        "--out",
        "-o",
        type=Path,
        default=Path("media"),
        help="where stems are downloaded: OUT/<profile>/<slug>/ (default ./media)",
    )


def run(args: argparse.Namespace) -> int:
    """Upload files to a profile's inputs, separate them through Dagster and download the stems."""
    config = load_config(args.config)
    profile = config.profile(args.profile)
    strategies = list(dict.fromkeys(args.strategy or profile.strategies))
    if not strategies:
        raise StemsetError(f"Profile {profile.name!r} runs no strategy.", "Name one with --strategy.")
    if args.local:
        config = dataclasses.replace(config, gpu=dataclasses.replace(config.gpu, backend="local"))
    terminal = sys.stderr
    with _dagster_output(getattr(args, "verbose", False)) as log_path:
        if log_path is not None:
            print(f"Dagster's logs: {log_path}", file=terminal, flush=True)
        rows = _process(args, config, profile, strategies, terminal)
    if rows is None:
        return 0
    _print_summary(rows)
    failed = [r for r in rows if not r.ok]
    seconds = sum({r.partition: r.seconds for r in rows}.values())
    where = f"; logs: {log_path}" if log_path is not None else ""
    if failed:
        print(f"\n{len(failed)} of {len(rows)} stem set(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.file} [{r.strategy}]: {_one_line(r.error)}", file=sys.stderr)
        print(f"failed: {len(rows) - len(failed)} of {len(rows)} stem set(s) made{where}", file=sys.stderr)
        return 1
    out = args.out.expanduser().absolute()
    cost = sum(r.cost for r in rows)
    print(f"done: {len(rows)} stem set(s) in {seconds:.1f} s, ${cost:.4f}, stems in {out}{where}")
    return 0


def _process(args, config, profile, strategies: list[str], terminal: IO[str]) -> list[Row] | None:
    """Upload, run and download; the summary rows (None: nothing to do)."""
    # Dagster loads only when a command runs, so `stemset --help` stays fast.
    from ..defs.intake import ingest_file
    from ..defs.resources.media_store import open_store
    from ..defs.runs import dagster_instance, selection_for

    selection_for(config, strategies)  # unknown strategies: a clear error before anything is uploaded
    store = open_store(config)
    instance = dagster_instance(config)
    quiet = True if args.quiet else None
    rows: list[Row] = []
    names: dict[str, str] = {}  # partition -> file name shown
    if args.files:
        files = [existing_file(f) for f in args.files]
        for path in tqdm(files, desc="upload", unit="file", disable=quiet, file=terminal):
            try:
                check_audio_file(path, path.name)
            except UploadRejected as err:
                rows += [Row(path.name, "-", s, False, error=err.message) for s in strategies]
                continue
            ingested = ingest_file(store, instance, profile.name, path)
            names[ingested.partition] = path.name
    else:
        names = _not_current(store, instance, config, profile.name, strategies)
        if not names:
            print(f"Every input of {profile.name!r} is current for {', '.join(strategies)}: nothing to do.")
            return None
    keys = list(names)
    timings = _run(config, instance, keys, strategies, local=args.local, quiet=quiet, terminal=terminal)
    out = args.out.expanduser().absolute()
    for pk in keys:
        seconds, error = timings.get(pk, (0.0, "not run"))
        for strategy in strategies:
            rows.append(_collect(store, config, pk, names[pk], strategy, seconds, error, out, len(strategies)))
    return rows


@contextlib.contextmanager
def _dagster_output(verbose: bool) -> Iterator[Path | None]:
    """Unless ``verbose``: what Dagster writes to stderr (logs, warnings, banners, tracebacks) goes
    to a new file under ``$DAGSTER_HOME/logs/``, whose path is yielded."""
    if verbose:
        yield None
        return
    # The instance's home as defs.runs.dagster_instance picks it (imported only once redirected:
    # importing the Dagster definitions already prints warnings).
    home = Path(os.environ.get("DAGSTER_HOME") or Path(".dagster_home").absolute())
    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"process-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with open(path, "a", encoding="utf-8", buffering=1) as log, contextlib.redirect_stderr(log):
        yield path


def _one_line(text: str | None, limit: int = 300) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _not_current(store, instance, config, profile: str, strategies: list[str]) -> dict[str, str]:
    """``{partition: file name}`` of the profile's inputs whose stem sets are not current (by the
    one state rule, :mod:`stemset_assets.core.state`); inputs never seen are registered."""
    # Dagster loads only when a command runs, so `stemset --help` stays fast.
    from ..defs.partitions import RECORDINGS_PARTITIONS, register_partitions
    from ..defs.status import read_status

    existing = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
    by_object = assign_partition_keys(profile, list_inputs(store, profile), existing)
    register_partitions(instance, by_object.values())
    names = {pk: obj.rsplit("/", 1)[-1] for obj, pk in by_object.items()}
    states = read_status(
        instance, config, strategies, profile, store=store, partitions=list(names), also_wanted=strategies
    )
    return {s.partition: names[s.partition] for s in states if s.state in TO_REDO}


def _run(
    config, instance, keys: list[str], strategies: list[str], *, local: bool, quiet, terminal: IO[str]
) -> dict[str, tuple[float, str | None]]:
    """Run every partition; ``{partition: (seconds, error or None)}``."""
    # Dagster loads only when a command runs, so `stemset --help` stays fast.
    from ..defs.runs import materialize_in_process, selection_for
    from ..defs.webserver import RUN_DONE, WebserverClient

    out: dict[str, tuple[float, str | None]] = {}
    url = config.dagster.webserver_url
    with tqdm(total=len(keys), desc="separate", unit="file", disable=quiet, file=terminal) as bar:
        if url and not local:
            client = WebserverClient(url)
            selection = selection_for(config, strategies)
            launched = {
                pk: (
                    client.launch_run(pk, selection, tags={"stemset/launched_by": "stemset process"}),
                    time.monotonic(),
                )
                for pk in keys
            }
            pending = dict(launched)
            while pending:
                for pk, (run_id, t0) in list(pending.items()):
                    status = client.run_status(run_id)
                    if status in RUN_DONE:
                        error = (
                            None if status == "SUCCESS" else f"run {run_id} ended {status}; see it in the Dagster UI"
                        )
                        out[pk] = (time.monotonic() - t0, error)
                        del pending[pk]
                        bar.update(1)
                if pending:
                    time.sleep(1.0)
            return out
        t0 = [time.monotonic()]

        def progress(done: int, total: int, outcome) -> None:
            now = time.monotonic()
            out[outcome.partition] = (now - t0[0], None if outcome.success else outcome.error)
            t0[0] = now
            bar.set_postfix_str(outcome.partition[-30:])
            bar.update(1)

        materialize_in_process(config, instance, keys, strategies, progress=progress)
    return out


def _collect(
    store, config, pk: str, name: str, strategy: str, seconds: float, error: str | None, out: Path, n_strategies: int
) -> Row:
    if error is not None:
        return Row(name, pk, strategy, False, seconds=seconds, error=error)
    manifest = read_manifest(store, pk, strategy)
    if manifest is None:
        return Row(name, pk, strategy, False, seconds=seconds, error="the run succeeded but wrote no stem set")
    folder = out / pk if n_strategies == 1 else out / pk / strategy
    download_stems(store, manifest, folder)
    return Row(
        name,
        pk,
        strategy,
        True,
        stems=", ".join(manifest.stems),
        seconds=seconds,
        cost=total_cost_usd(manifest, config),
        folder=folder,
    )


def _print_summary(rows: list[Row]) -> None:
    table = [("file", "strategy", "stems", "seconds", "cost", "where")]
    for r in rows:
        table.append(
            (
                r.file,
                r.strategy,
                r.stems if r.ok else "FAILED",
                f"{r.seconds:.1f}",
                f"${r.cost:.4f}",
                str(r.folder) if r.folder else "-",
            )
        )
    print(format_table(table))

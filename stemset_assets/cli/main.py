"""The `stemset` command line: one subcommand per entry of :data:`COMMANDS`.

Errors a user can act on print as one paragraph (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable

from gpu_worker.errors import StemsetError
from gpu_worker.worker_args import add_worker_args

from . import api, automation, catalog, deploy, dev, process, separate


def run_worker(args: argparse.Namespace) -> int:
    """Run a separation worker on this machine (`stemset worker serve`)."""
    from gpu_worker.http_worker import run_worker as run  # lazy: Starlette loads only to serve

    return run(args)


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "separate": (separate.add_args, separate.run),
    "worker": (add_worker_args, run_worker),
    "process": (process.add_args, process.run),
    "catalog": (catalog.add_args, catalog.run),
    "dev": (dev.add_args, dev.run),
    "api": (api.add_args, api.run),
    "status": (automation.add_status_args, automation.run_status),
    "backfill": (automation.add_backfill_args, automation.run_backfill),
    "deploy": (deploy.add_args, deploy.run),
}
"""``name: (add its arguments to a parser, run it)``; the run function's docstring is the help."""


def _common_args(p: argparse.ArgumentParser, default=None) -> None:
    # Given to the main parser and to every subcommand, so they work before or after it
    # (a subcommand that defines one of them itself keeps its own).
    flag = default if default is not None else False
    options = [
        (
            ("--config", "-c"),
            {
                "default": default,
                "help": "config file (default: $STEMSET_CONFIG, else ./config.yaml, else built-in defaults)",
            },
        ),
        (("--debug",), {"action": "store_true", "default": flag, "help": "show tracebacks"}),
        (("--quiet", "-q"), {"action": "store_true", "default": flag, "help": "no progress bars"}),
    ]
    for names, kwargs in options:
        if not any(name in p._option_string_actions for name in names):
            p.add_argument(*names, **kwargs)


def _with_nested(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-subcommand parser below it (``api serve``, ``worker serve``)."""
    out = [parser]
    for action in parser._actions:  # argparse offers no public walk over subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += _with_nested(child)
    return out


def build_parser() -> argparse.ArgumentParser:
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


def entry() -> None:
    """The `stemset` command (and ``python -m stemset_assets.cli``): :func:`main`, then exit."""
    code = main()
    # The process ends next: put every object in the GC's permanent generation so the interpreter's
    # last collection does not walk them all (~0.7 s after a status of 100,000 rows).
    gc.freeze()
    sys.exit(code)


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
        print(
            f"error: unexpected {type(err).__name__}: {err}. Run again with --debug for the traceback "
            "and report it if it persists.",
            file=sys.stderr,
        )
        return 1

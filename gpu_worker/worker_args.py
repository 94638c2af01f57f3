"""The arguments of `stemset worker serve` and `python -m gpu_worker.http_worker`, without the server.

Kept apart from :mod:`.http_worker` so that building the `stemset` parser (every command, and
`stemset --help`) does not import Starlette; the server loads when `worker serve` runs.
"""

from __future__ import annotations

import argparse

TOKEN_ENV = "GPU_WORKER_TOKEN"
LOCAL_ROOTS_ENV = "STEMSET_WORKER_LOCAL_ROOTS"  # os.pathsep-separated folders jobs may use as local storage
SERVE_HELP = "Serve the separation worker over HTTP (token from $GPU_WORKER_TOKEN)."


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help=f"address to bind (default 127.0.0.1; any other needs {TOKEN_ENV})"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--model-repo",
        default=None,
        help="Demucs model folder on this machine (default $STEMSET_MODEL_REPO, else Demucs' download)",
    )
    p.add_argument(
        "--preload",
        default=None,
        help="comma-separated models to load at start (default $STEMSET_PRELOAD_MODELS, else none)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=4,
        help="jobs in flight (default 4: the pipeline overlaps them on one GPU)",
    )
    p.add_argument(
        "--gpu-type",
        default=None,
        help="this machine's GPU type as priced in gpu.prices_per_hour (default $STEMSET_GPU_TYPE)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--allow-local-root",
        action="append",
        default=None,
        metavar="DIR",
        help=f"a folder jobs may use as local storage (repeatable; default ${LOCAL_ROOTS_ENV}, else none: s3 only)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """For `stemset worker ...`: a `serve` subcommand with :func:`add_serve_args`."""
    subs = p.add_subparsers(dest="worker_command", metavar="WORKER_COMMAND", required=True)
    serve_parser = subs.add_parser("serve", help="serve the separation worker over HTTP", description=SERVE_HELP)
    add_serve_args(serve_parser)

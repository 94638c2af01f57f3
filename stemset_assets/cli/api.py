"""`stemset api serve`: the web API and player page (:mod:`stemset_assets.api`) on uvicorn."""

from __future__ import annotations

import argparse

from ..config import load_config

DEFAULT_PORT = 8080


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="api_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve the upload/jobs API and the player page")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    """The web API and player page: `stemset api serve [--host 127.0.0.1] [--port 8080]`."""
    # The API (Starlette, uvicorn, Dagster) loads only when it is served, so `stemset --help` stays fast.
    from ..api.server import serve

    serve(load_config(args.config), host=args.host, port=args.port)
    return 0

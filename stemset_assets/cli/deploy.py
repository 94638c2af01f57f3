"""`stemset deploy render`: the production Dagster files made from config.yaml."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from ..core.deploy_files import render, rendered_text


def add_args(p: argparse.ArgumentParser) -> None:
    subs = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    r = subs.add_parser("render", help="write deploy/dagster.yaml and deploy/helm/values.yaml from config.yaml")
    r.add_argument("--out", default="deploy", help="folder to write into (default: ./deploy)")
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files differ from config.yaml")


def run(args: argparse.Namespace) -> int:
    """Production Dagster: render deploy/dagster.yaml and the Helm values from config.yaml."""
    config = load_config(args.config)
    out = Path(args.out)
    if args.check:
        stale = [
            rel
            for rel, text in rendered_text(config).items()
            if not (out / rel).is_file() or (out / rel).read_text() != text
        ]
        for rel in stale:
            print(f"{out / rel} differs from what config.yaml renders: run `stemset deploy render`")
        return 1 if stale else 0
    for path in render(config, out):
        print(f"wrote {path}")
    return 0

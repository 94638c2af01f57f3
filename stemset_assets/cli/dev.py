"""`stemset dev`: `dagster dev -w workspace.yaml` with Stemset's defaults (DAGSTER_HOME, the config)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gpu_worker.errors import StemsetError

ROOT = Path(__file__).resolve().parents[2]
"""The checkout (its workspace.yaml serves when the current folder has none)."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dagster_args", nargs=argparse.REMAINDER, help="passed on to `dagster dev` (e.g. -p 3001)")


def dev_command(config_path: str | None, extra: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The `dagster dev` command line and environment `stemset dev` runs."""
    # Dagster loads only when a command runs, so `stemset --help` stays fast.
    from ..defs.runs import DEFAULT_HOME

    workspace = Path("workspace.yaml")
    if not workspace.is_file():
        workspace = ROOT / "workspace.yaml"
    if not workspace.is_file():
        raise StemsetError(
            "No workspace.yaml here or in the Stemset checkout.",
            "Run `stemset dev` from the project folder (the one with workspace.yaml).",
        )
    env = dict(env)
    if not env.get("DAGSTER_HOME"):
        env["DAGSTER_HOME"] = str(Path(DEFAULT_HOME).absolute())
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    if config_path:
        env["STEMSET_CONFIG"] = str(Path(config_path).expanduser().absolute())
    extra = [a for a in extra if a != "--"]
    return [sys.executable, "-m", "dagster", "dev", "-w", str(workspace.absolute()), *extra], env


def run(args: argparse.Namespace) -> int:
    """Run `dagster dev -w workspace.yaml` (DAGSTER_HOME defaults to ./.dagster_home)."""
    argv, env = dev_command(args.config, args.dagster_args, dict(os.environ))
    print(f"DAGSTER_HOME={env['DAGSTER_HOME']}", flush=True)
    return subprocess.call(argv, env=env)

"""Issue 14, deliver 8: the quickstart without network says so in one line naming
STEMSET_DEMO_MODELS=1 (no tracebacks on the terminal), a failed run shows FAILED rather than
100%, and the demo-models run pins its model repo in the config it writes, so its sets read
current afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSET_", "DAGSTER_", "TORCH_"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), **extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_offline_quickstart_is_one_clear_message(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every download fails at once: offline
    env = _env(tmp_path, TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY=proxy, HTTP_PROXY=proxy, NO_PROXY="")
    out = _run(["-m", "stemset_assets.cli.quickstart"], tmp_path, env)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert text.count("STEMSET_DEMO_MODELS=1") == 1 and "no network?" in text, text
    assert "Traceback" not in text and len(text.splitlines()) < 20, text  # not ~290 lines
    assert "100%" not in out.stderr and "FAILED" in out.stderr, out.stderr  # the bar shows failure
    assert "no network?" in (tmp_path / ".dagster_home" / "quickstart.log").read_text()  # the detail: in the log


def test_demo_models_keep_their_repo_so_sets_read_current_afterwards(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    env = _env(tmp_path)
    out = _run(["-m", "stemset_assets.cli.quickstart", "--demo-models"], tmp_path, env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    demo = tmp_path / ".stemset" / "demo-config.yaml"
    assert demo.is_file() and str(tmp_path / ".stemset" / "demo-models") in demo.read_text()
    # afterwards, in a new shell: the catalog under the demo's config reads current
    after = _run(
        ["-m", "stemset_assets.cli", "catalog", "--format", "json"], tmp_path, {**env, "STEMSET_CONFIG": str(demo)}
    )
    assert after.returncode == 0, after.stderr[-3000:]
    rows = json.loads(after.stdout)["rows"]
    assert rows and {r["state"] for r in rows if r["default"]} == {"current"}, rows

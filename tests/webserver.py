"""A real dagster-webserver on loopback for tests (Stemset's workspace.yaml with a test config,
runs launched at once in subprocesses), the dagster-daemon for backfills, and a `dagster code-server`
for a gRPC workspace; all stopped on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stemset_assets.defs.webserver import WebserverClient
from tests.remote_fixtures import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120


@contextmanager
def dagster_webserver(
    home: Path,
    config_path: Path,
    *,
    instance_yaml: str | None = None,
    workspace: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[WebserverClient]:
    """``instance_yaml``: the instance's dagster.yaml (default: SQLite, runs launched at once);
    ``workspace``: the workspace file (default: Stemset's); ``env``: extra variables."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        instance_yaml
        or "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "STEMSET_CONFIG": str(config_path),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    port = free_port()
    log_path = home / "webserver.log"  # a file, not a pipe: nobody reads a pipe while tests run
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster_webserver",
                "-w",
                str(workspace or ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = WebserverClient(f"http://127.0.0.1:{port}", timeout_s=5)
        wait_until_up(
            proc,
            client.reachable,
            STARTUP_TIMEOUT_S,
            "dagster-webserver",
            lambda: log_path.read_text(errors="replace"),
            1.0,
        )
        yield client
    finally:
        _stop(proc)


@contextmanager
def dagster_daemon(
    home: Path,
    config_path: Path,
    *,
    workspace: Path | None = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` on the same instance (needs the webserver's dagster.yaml in ``home``)."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "STEMSET_CONFIG": str(config_path),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace or ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        servers = _children(proc.pid)  # its code servers: they outlive it while a run process lingers
        _stop(proc)
        _reap(servers, timeout_s=30)
        if log_path:
            log.close()


@contextmanager
def code_server(config_path: Path, module: str, env: dict[str, str], log_path: Path):
    """`dagster code-server start` on loopback: the code location as its own process (as in compose)."""
    port = free_port()
    full_env = {**os.environ, "STEMSET_CONFIG": str(config_path), "PYTHONPATH": str(ROOT), **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "code-server", "start", "-h", "127.0.0.1", "-p", str(port)]
            + ["-m", module, "--location-name", "stemset", "-d", str(ROOT)],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until_up(proc, listening, 120, "dagster code-server", lambda: log_path.read_text(errors="replace"))
        yield port
    finally:
        _stop(proc)


def grpc_workspace(path: Path, port: int) -> Path:
    path.write_text(
        f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {port}\n      location_name: stemset\n"
    )
    return path


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return out


def _reap(pids: list[int], timeout_s: float) -> None:
    """Wait for ``pids`` (and their children) to exit; SIGKILL what is left after ``timeout_s``.
    A code server whose run worker outlived the test's Postgres never exits by itself."""
    pids = pids + [c for p in pids for c in _children(p)]
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)

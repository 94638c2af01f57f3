"""A real `stemset api serve` on a free loopback port for the API and browser tests: local media
folder, tiny models, its own Dagster home; stopped (SIGTERM, then SIGKILL) when the test is done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.configs import tiny_config_yaml
from tests.remote_fixtures import free_port, http_ok, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0

API = """\
api:
  token: ${STEMSET_API_TOKEN:-}
  auth: %(auth)s
  max_upload_mb: %(max_upload_mb)d
  public_url: ${STEMSET_API_URL:-}
"""


@dataclass
class ApiServer:
    url: str
    token: str | None
    media: Path
    log_path: Path
    process: subprocess.Popen

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(
    folder: Path,
    repo: Path,
    auth: bool = True,
    sections: str = "",
    storage: str | None = None,
    max_upload_mb: int = 1,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(
        tiny_config_yaml(
            repo,
            folder / "media",
            storage=storage,
            sections=API % {"auth": "true" if auth else "false", "max_upload_mb": max_upload_mb} + sections,
        )
    )
    return path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextmanager
def api_server(
    folder: Path,
    repo: Path,
    token: str | None = "t0ken-" + os.urandom(8).hex(),
    sections: str = "",
    *,
    storage: str | None = None,
    env: dict[str, str] | None = None,
    max_upload_mb: int = 1,
) -> Iterator[ApiServer]:
    """``storage`` replaces the local storage block of the config; ``env`` adds variables."""
    config = write_config(
        folder, repo, auth=token is not None, sections=sections, storage=storage, max_upload_mb=max_upload_mb
    )
    port = free_port()
    extra = env or {}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_WEBSERVER_URL", "STEMSET_API_TOKEN", "STEMSET_API_URL")
    }
    env.update({"DAGSTER_HOME": str(folder / "home"), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra})
    if token:
        env["STEMSET_API_TOKEN"] = token
    log_path = folder / "api.log"
    with open(log_path, "ab") as log:  # appended: a restarted server keeps the earlier log
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from stemset_assets.cli.main import main; sys.exit(main())",
                "--config",
                str(config),
                "api",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ApiServer(f"http://127.0.0.1:{port}", token, folder / "media", log_path, proc)
    try:
        wait_until_up(proc, http_ok(f"{server.url}/healthz"), STARTUP_TIMEOUT_S, "the API server", server.log)
        yield server
    finally:
        stop(proc)


def wait_for_job(server: ApiServer, job_id: str, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    seen = set()
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/api/jobs/{job_id}", headers=server.headers(), timeout=10).json()
        seen.add(job["status"])
        if job["status"] in ("complete", "error"):
            job["seen"] = seen
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s (statuses seen: {seen})")

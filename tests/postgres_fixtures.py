"""A real PostgreSQL server for tests, from the ``pgserver`` wheel's binaries (no Docker).

``initdb`` into a fresh temporary folder, then ``postgres`` listening on 127.0.0.1 only, on a free
port, with password authentication for the ``postgres`` user and durability switched off (a test
database: fsync, synchronous_commit and full-page writes off). PostgreSQL refuses to run as root,
so as root the server runs as a system user made for it (``useradd``). Each test gets its own
database (:meth:`PostgresServer.create_database`) and the ``DAGSTER_PG_*`` variables that
``deploy/dagster.yaml`` reads. Startup and shutdown are bounded in time.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.remote_fixtures import free_port

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
SERVICE_USER = "stemset-pg"


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` from the pgserver wheel, or None."""
    spec = importlib.util.find_spec("pgserver")  # located, not imported: its __init__ has side effects
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if (path / "postgres").is_file() else None


def _service_user() -> str | None:
    """None when not root; else a system user to run the server as (made once)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return SERVICE_USER


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen = field(repr=False)
    startup_s: float = 0.0

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=db, connect_timeout=5
        )

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def env(self, db: str) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads, for database ``db``."""
        return {
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": db,
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.data_dir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _run_as(user: str | None, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, user=user, check=True, capture_output=True, text=True, timeout=120, **kwargs)


def start_postgres() -> PostgresServer:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL binaries not found: `pip install pgserver` (part of the test extra).")
    user = _service_user()
    data_dir = Path(tempfile.mkdtemp(prefix="stemset-pg-"))  # under /tmp: reachable by the service user
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    password = secrets.token_urlsafe(18)
    pwfile = data_dir / "pwfile"
    pwfile.write_text(password + "\n")
    if user is not None:
        os.chown(pwfile, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    pgdata = data_dir / "pgdata"
    _run_as(
        user,
        [
            str(bin_dir / "initdb"),
            "-D",
            str(pgdata),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        ],
    )
    pwfile.unlink()
    port = free_port()
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - kept open for the server's life
    if user is not None:
        os.chown(data_dir / "server.log", pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            str(bin_dir / "postgres"),
            "-D",
            str(pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(data_dir),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=64MB",
        ],
        user=user,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    atexit.register(_stop, proc, data_dir)
    server = PostgresServer("127.0.0.1", port, "postgres", password, data_dir, proc)
    deadline = t0 + STARTUP_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with code {proc.returncode}:\n{server.log_tail()}")
        try:
            server.connect().close()
            server.startup_s = time.monotonic() - t0
            return server
        except Exception as err:  # noqa: BLE001 - not accepting connections yet
            last = err
            time.sleep(0.2)
    _stop(proc, data_dir)
    raise RuntimeError(f"postgres was not ready within {STARTUP_TIMEOUT_S:.0f} s ({last}):\n{server.log_tail()}")


def _stop(proc: subprocess.Popen, data_dir: Path) -> None:
    """Fast shutdown (SIGINT), bounded; then SIGKILL; then remove the data folder."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=STOP_TIMEOUT_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    shutil.rmtree(data_dir, ignore_errors=True)


def stop_postgres(server: PostgresServer) -> None:
    _stop(server.process, server.data_dir)

"""The web API's job worker: one child process that executes queued Dagster runs by id.

Spawned on the first job and kept (its model cache stays warm), it takes one run id at a time
over a pipe and answers the run's final status. It never outlives the API: it exits when its
parent is gone (Linux's parent-death signal, and a watch on its parent pid), and
:meth:`JobWorker.stop` ends it (SIGTERM, then SIGKILL) when the API shuts down. When it dies
mid-run, :meth:`JobWorker.run` answers None and the next run gets a fresh worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from ..config import StemsetConfig

log = logging.getLogger(__name__)

PARENT_POLL_S = 0.5


class JobWorker:
    """The child process; ``run(run_id)`` blocks until the run ends or the process dies."""

    def __init__(self, config: StemsetConfig, resources: dict[str, Any] | None = None):
        self.config = config
        self.resources = resources
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        proc = self._process
        return proc.pid if proc is not None and proc.is_alive() else None

    def _ensure(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                ctx = multiprocessing.get_context("spawn")
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child, self.config, self.resources, os.getpid()),
                    name="stemset-job-worker",
                )
                proc.start()
                child.close()
                self._process, self._conn = proc, parent
            return self._process, self._conn

    def run(self, run_id: str) -> str | None:
        """Execute ``run_id`` in the worker; the run's status, or None when the worker died."""
        proc, conn = self._ensure()
        try:
            conn.send(run_id)
            while True:
                ready = wait([conn, proc.sentinel])
                if conn in ready:
                    got_id, status = conn.recv()
                    if got_id == run_id:
                        return status
                elif proc.sentinel in ready:
                    break
        except (EOFError, OSError):
            pass
        proc.join(5)
        with self._lock:
            self._process = self._conn = None
        return None

    def stop(self, grace_s: float = 5.0) -> None:
        """End the worker: SIGTERM, then SIGKILL after ``grace_s``; waits until it is gone."""
        with self._lock:
            proc, conn = self._process, self._conn
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if conn is not None:
            conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the API process is gone (a worker must never be left behind)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(PARENT_POLL_S)

    if os.getppid() != parent_pid:
        os._exit(70)
    threading.Thread(target=watch, name="stemset-parent-watch", daemon=True).start()


def _worker_main(conn: Connection, config: StemsetConfig, resources: dict[str, Any] | None, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # The API ends this process (SIGTERM) and fails or requeues a run in hand; Ctrl-C in the
    # terminal is the API's to handle, not this process's.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..defs.queued_runs import execute_queued_run
    from ..defs.runs import dagster_instance

    instance = dagster_instance(config)  # $DAGSTER_HOME, inherited from the API process
    while True:
        try:
            run_id = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # Dagster maps SIGTERM to KeyboardInterrupt
            return
        if run_id is None:
            return
        try:
            run = execute_queued_run(instance, config, run_id, resources)
            status = run.status.value if run is not None else None
        except Exception:  # noqa: BLE001 - the run is failed; the worker goes on
            logging.getLogger(__name__).exception("run %s could not be executed", run_id)
            status = "FAILURE"
        conn.send((run_id, status))

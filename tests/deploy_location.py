"""A test code location: Stemset's definitions with a separator that fails once where told to.

``$STEMSET_TEST_FLAKY_DIR/<profile>__<slug>.fail``: the first separation of that partition returns
an error (as a worker that lost its GPU would); ``.kill``: the step's process kills itself (SIGKILL,
as the kernel's OOM killer would); ``.killworker``: the step kills its parent, the run worker
(the multiprocess executor's parent process, which the code server started), then itself, so the
run is left with no process to end it; ``.killserver``: as ``.killworker``, the code server that
started the run worker first (a host or container restart: no process is left that knows the run).
Each marker is removed when it fires, so a retry succeeds.
Everything else is the real code location (``stemset_assets.definitions``) on the local separator.
"""

import os
import signal
from pathlib import Path

import dagster as dg

from gpu_worker.errors import JobError
from stemset_assets.config import load_config
from stemset_assets.defs.build import build_definitions
from stemset_assets.defs.resources.separator import SeparatorResource


class FlakySeparator(SeparatorResource):
    flaky_dir: str = ""

    def separate_many(self, jobs, store):
        for job in jobs:
            marker = Path(self.flaky_dir) / job.metadata.get("partition_key", "").replace("/", "__")
            if marker.with_suffix(".killserver").exists():
                marker.with_suffix(".killserver").unlink()
                _kill_run_processes(with_code_server=True)
            if marker.with_suffix(".killworker").exists():
                marker.with_suffix(".killworker").unlink()
                _kill_run_processes(with_code_server=False)
            if marker.with_suffix(".kill").exists():
                marker.with_suffix(".kill").unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            if marker.with_suffix(".fail").exists():
                marker.with_suffix(".fail").unlink()
                return [JobError("the GPU worker went away (test)") for _ in jobs]
        return super().separate_many(jobs, store)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _kill_run_processes(with_code_server: bool) -> None:
    """SIGKILL (the code server, when asked,) this step's run worker, then this step's process."""
    worker = os.getppid()
    if b"multiprocessing" not in Path(f"/proc/{worker}/cmdline").read_bytes():  # the code server's spawned child
        raise RuntimeError(f"this step's parent {worker} is not a run worker")
    pids = [worker, os.getpid()]
    if with_code_server:
        server = _parent(worker)
        cmd = Path(f"/proc/{server}/cmdline").read_bytes()
        if b"dagster" not in cmd or b"grpc" not in cmd:  # never kill anything but a code server
            raise RuntimeError(f"the run worker's parent {server} is not a dagster code server: {cmd[:200]!r}")
        pids.insert(0, server)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@dg.definitions
def defs() -> dg.Definitions:
    config = load_config()
    flaky = FlakySeparator(flaky_dir=os.environ.get("STEMSET_TEST_FLAKY_DIR", "/nonexistent"))
    return build_definitions(config, resources={"separator": flaky})

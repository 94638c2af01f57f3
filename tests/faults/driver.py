"""Run one separation job in this process and die at a set point: ``python -m tests.faults.driver JOB.json POINT``.

POINT is ``<call>:<before|after>:<n>`` (the n-th matching call of the real object store) or ``none``.
Calls: ``download`` (fetching the input: before separating), ``upload`` (a stem to staging: after
separating), ``publish`` (a staged stem into its set folder), ``manifest`` (the commit). At the
point the process either SIGKILLs itself (``STEMSET_FAULT=kill``, a crash: no cleanup, no
finally) or writes ``$STEMSET_FAULT_MARK`` and waits for ``$STEMSET_FAULT_GO`` to appear
(``STEMSET_FAULT=pause``: the test stops the S3 server meanwhile, then lets the job go on).
Nothing is mocked: the store is the real one the job names; only the timing is chosen.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from gpu_worker.job import MANIFEST_NAME, SeparationJob
from gpu_worker.worker import open_store, run_job

METHODS = {"download": "download", "upload": "upload", "publish": "_publish_object", "manifest": "put_bytes"}


def _at_point() -> None:
    if os.environ.get("STEMSET_FAULT", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(os.environ["STEMSET_FAULT_MARK"]).write_text("paused")
    go = Path(os.environ["STEMSET_FAULT_GO"])
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def arm(store, point: str) -> None:
    call, when, nth = point.split(":")
    method = METHODS[call]
    real = getattr(store, method)
    seen = [0]

    def wrapped(*args, **kwargs):
        if call == "manifest" and not str(args[0]).endswith(MANIFEST_NAME):
            return real(*args, **kwargs)
        seen[0] += 1
        if seen[0] == int(nth) and when == "before":
            _at_point()
        out = real(*args, **kwargs)
        if seen[0] == int(nth) and when == "after":
            _at_point()
        return out

    setattr(store, method, wrapped)


def main() -> int:
    job = SeparationJob.from_json(Path(sys.argv[1]).read_text())
    point = sys.argv[2]
    store = open_store(job.storage)
    if point != "none":
        arm(store, point)
    result = run_job(job, store=store)
    print(result.manifest_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())

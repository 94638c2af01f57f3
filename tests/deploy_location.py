"""A test code location: Stemset's definitions with a separator that fails once where told to.

``$STEMSET_TEST_FLAKY_DIR/<profile>__<slug>.fail``: the first separation of that partition returns
an error (as a worker that lost its GPU would); ``.kill``: the run's process kills itself (SIGKILL,
as the kernel's OOM killer would). Each marker is removed when it fires, so a retry succeeds.
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
            if marker.with_suffix(".kill").exists():
                marker.with_suffix(".kill").unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            if marker.with_suffix(".fail").exists():
                marker.with_suffix(".fail").unlink()
                return [JobError("the GPU worker went away (test)") for _ in jobs]
        return super().separate_many(jobs, store)


@dg.definitions
def defs() -> dg.Definitions:
    config = load_config()
    flaky = FlakySeparator(flaky_dir=os.environ.get("STEMSET_TEST_FLAKY_DIR", "/nonexistent"))
    return build_definitions(config, resources={"separator": flaky})

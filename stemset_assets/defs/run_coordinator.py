"""The production run coordinator: Dagster's ``QueuedRunCoordinator`` that makes sure every run
which separates stems carries :data:`~stemset_assets.core.run_tags.GPU_TAG`.

Stemset's own launches (sensors, ``stemset process``/``backfill``, the web API) set the tag
themselves; runs started from the Dagster UI (Materialize, a backfill from the asset page) or by
Dagster's backfill daemon from a UI backfill do not. This coordinator adds the tag, at submission
and before the run is queued, to any run whose asset selection holds a ``stems/...`` asset, so
the tag concurrency limit in ``deploy/dagster.yaml`` (``runs.gpu_concurrency``) caps them all.
Everything else (limits, dequeueing, priorities) is the ``QueuedRunCoordinator``'s, configured as
usual (``max_concurrent_runs``, ``tag_concurrency_limits``, ``dequeue_interval_seconds``, ...).

``deploy/dagster.yaml``::

    run_coordinator:
      module: stemset_assets.defs.run_coordinator
      class: StemsetRunCoordinator
      config: {max_concurrent_runs: 20, tag_concurrency_limits: [{key: stemset/gpu, value: "true", limit: 4}]}
"""

from __future__ import annotations

from dagster import DagsterRun, QueuedRunCoordinator, SubmitRunContext

from ..core.run_tags import GPU_TAG, STEMS_KEY_PREFIX, gpu_tags


def separates_stems(run: DagsterRun) -> bool:
    """Whether ``run`` materialises a stem asset (``stems/<strategy>/<stem>``)."""
    keys = run.asset_selection or frozenset()
    return any(key.path and key.path[0] == STEMS_KEY_PREFIX for key in keys)


class StemsetRunCoordinator(QueuedRunCoordinator):
    """A ``QueuedRunCoordinator`` that tags every stems run ``stemset/gpu=true`` before queuing it."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        if GPU_TAG not in run.tags and separates_stems(run):
            self._instance.add_run_tags(run.run_id, gpu_tags())
            reloaded = self._instance.get_run_by_id(run.run_id)
            if reloaded is not None:
                context = SubmitRunContext(reloaded, context.workspace)
        return super().submit_run(context)

"""Runs queued in the Dagster instance and executed later by a worker process (the web API's jobs).

The run is made first, as ``NOT_STARTED`` with the caller's tags, so the queue is the instance's
run storage: it outlives the process that made it. A worker executes it by id with
:func:`execute_queued_run` (in-process executor: the model cache stays in the worker). Dagster's
own queue daemon never touches ``NOT_STARTED`` runs, so a `dagster dev` on the same instance
does not run them twice.

A run whose worker process died stays ``STARTED`` in the instance; :func:`fail_dead_runs` finds
those (the worker records its pid and host as run tags) and marks them failed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    JobDefinition,
    RunsFilter,
    define_asset_job,
    in_process_executor,
)
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.execution.api import execute_run

from ..config import StemsetConfig
from .asset_keys import RECORDING_KEY, stem_keys
from .build import build_definitions
from .partitions import register_partitions
from .runs import selection_for

QUEUED_JOB = "stemset_queued"
QUEUE_TAG = "stemset/queue"
WORKER_PID_TAG = "stemset/worker_pid"
WORKER_HOST_TAG = "stemset/worker_host"
LIVE = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)


def queued_job(config: StemsetConfig, resources: dict[str, Any] | None = None) -> JobDefinition:
    """``recording`` and every stem asset, executed in the calling process; a run picks its subset."""
    defs = build_definitions(config, resources=resources)
    job = define_asset_job(
        QUEUED_JOB,
        selection=AssetSelection.assets(RECORDING_KEY, *stem_keys(config, list(config.strategies))),
        executor_def=in_process_executor,
    )
    return Definitions(
        assets=list(defs.assets or []), jobs=[job], resources=dict(defs.resources or {})
    ).resolve_job_def(QUEUED_JOB)


def create_queued_run(
    instance: DagsterInstance,
    config: StemsetConfig,
    partition: str,
    strategies: Sequence[str],
    tags: dict[str, str],
    queue: str,
    parent_run_id: str | None = None,
) -> DagsterRun:
    """A ``NOT_STARTED`` run of ``recording`` plus ``strategies``' stems for ``partition``, in ``queue``."""
    selection = set(selection_for(config, strategies))
    register_partitions(instance, [partition])
    return instance.create_run_for_job(
        _job_for(config),
        asset_selection=selection,
        status=DagsterRunStatus.NOT_STARTED,
        parent_run_id=parent_run_id,
        root_run_id=parent_run_id,
        tags={"dagster/partition": partition, "stemset/launched_by": "stemset", QUEUE_TAG: queue, **tags},
    )


_JOBS: dict[int, tuple[StemsetConfig, JobDefinition]] = {}


def _job_for(config: StemsetConfig) -> JobDefinition:
    """The queued job of ``config``, built once per config object (building reads model files)."""
    held = _JOBS.get(id(config))
    if held is None or held[0] is not config:
        held = _JOBS[id(config)] = (config, queued_job(config))
    return held[1]


def queued_runs(instance: DagsterInstance, queue: str, limit: int | None = 1) -> list[DagsterRun]:
    """The queue's runs not yet started, oldest first (the first ``limit``)."""
    records = instance.get_run_records(
        filters=RunsFilter(tags={QUEUE_TAG: queue}, statuses=[DagsterRunStatus.NOT_STARTED]),
        limit=limit,
        order_by="create_timestamp",
        ascending=True,
    )
    return [r.dagster_run for r in records]


def execute_queued_run(
    instance: DagsterInstance, config: StemsetConfig, run_id: str, resources: dict[str, Any] | None = None
) -> DagsterRun:
    """Execute the ``NOT_STARTED`` run ``run_id`` in this process; its run (ended) is returned.
    The pid and host of this process are tagged on it first, so a crash can be told apart."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.status != DagsterRunStatus.NOT_STARTED:
        return run
    instance.add_run_tags(run_id, {WORKER_PID_TAG: str(os.getpid()), WORKER_HOST_TAG: socket.gethostname()})
    job = queued_job(config, resources) if resources else _job_for(config)
    try:
        execute_run(InMemoryJob(job), instance.get_run_by_id(run_id), instance)
    finally:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:  # an error before Dagster could end the run itself
            instance.report_run_failed(run, "the run could not be executed; see the worker's log")
    return instance.get_run_by_id(run_id)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def fail_dead_runs(instance: DagsterInstance, queue: str, message: str, alive=pid_alive) -> list[str]:
    """Mark failed the queue's started runs whose worker process (on this host) is gone; their ids."""
    host = socket.gethostname()
    failed = []
    for run in instance.get_runs(filters=RunsFilter(tags={QUEUE_TAG: queue}, statuses=list(LIVE))):
        pid = run.tags.get(WORKER_PID_TAG)
        if run.tags.get(WORKER_HOST_TAG) != host or not (pid or "").isdigit() or alive(int(pid)):
            continue
        instance.report_run_failed(run, message)
        failed.append(run.run_id)
    return failed

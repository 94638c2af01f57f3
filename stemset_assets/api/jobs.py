"""The web API's jobs: one Dagster run per uploaded file.

A job is launched through the Dagster webserver's GraphQL when ``dagster.webserver_url`` is set
(and reachable), else run in a worker process (spawned once, kept for later jobs so its model
cache stays warm; jobs queue up and run one at a time, so the SQLite instance sees one writer).
Separation never runs inside the API server's process: a crash or a memory spike there takes
down one job, not the server. Either way the run carries the tag ``stemset/job_id``, so a job
can be found again in the instance after the API restarts, and its steps show its progress.

Status: ``queued`` (waiting for the worker or the run coordinator), ``running``, ``complete``
(every stem set requested has its manifest), ``error`` (with the run's first failure).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from dagster import DagsterEventType, DagsterInstance, RunsFilter

from gpu_worker.errors import StemsetError
from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.layout import read_manifest
from ..defs.runs import dagster_instance, materialize_in_process, selection_for
from ..defs.webserver import WebserverClient

log = logging.getLogger(__name__)

JOB_TAG = "stemset/job_id"
STRATEGIES_TAG = "stemset/strategies"
QUEUED, RUNNING, COMPLETE, ERROR = "queued", "running", "complete", "error"
_RUN_STATUS = {  # Dagster run status -> job status
    "QUEUED": QUEUED,
    "NOT_STARTED": QUEUED,
    "STARTING": RUNNING,
    "STARTED": RUNNING,
    "CANCELING": RUNNING,
    "SUCCESS": COMPLETE,
    "FAILURE": ERROR,
    "CANCELED": ERROR,
}


@dataclass
class Job:
    job_id: str
    partition: str
    strategies: list[str]
    status: str = QUEUED
    run_id: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    via: str = "in-process"  # or "webserver"


class JobManager:
    """Submits and tracks jobs. ``media_url(key)`` makes the URL a stem is served from."""

    def __init__(
        self,
        config: StemsetConfig,
        instance: DagsterInstance,
        store: ObjectStore,
        *,
        webserver: WebserverClient | None = None,
        resources: dict[str, Any] | None = None,
    ):
        self.config = config
        self.instance = instance
        self.store = store
        self.webserver = webserver
        self.resources = resources
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._pool: ProcessPoolExecutor | None = None

    # ------------------------------------------------------------------ submitting

    def submit(self, partition: str, strategies: list[str]) -> Job:
        job = Job(job_id=uuid.uuid4().hex[:16], partition=partition, strategies=list(strategies))
        tags = {JOB_TAG: job.job_id, STRATEGIES_TAG: ",".join(strategies)}
        with self._lock:
            self._jobs[job.job_id] = job
        if self.webserver is not None:
            job.via = "webserver"
            try:
                job.run_id = self.webserver.launch_run(partition, selection_for(self.config, strategies), tags=tags)
            except StemsetError as err:
                self._finish(job, ERROR, str(err))
            return job
        self._ensure_worker()
        self._queue.put(job)
        return job

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="stemset-api-jobs", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.status = RUNNING
            tags = {JOB_TAG: job.job_id, STRATEGIES_TAG: ",".join(job.strategies)}
            try:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
                outcome = self._pool.submit(
                    _materialize_in_worker, self.config, job.partition, job.strategies, tags, self.resources
                ).result()
                job.run_id = outcome.run_id
                if outcome.success:
                    self._finish(job, COMPLETE)
                else:
                    self._finish(job, ERROR, outcome.error or "the run failed")
            except BrokenProcessPool:
                self._pool = None  # a fresh worker for the next job
                self._finish(
                    job,
                    ERROR,
                    "the worker process died during the job (out of memory?); "
                    "upload again to retry, and see the API server's log",
                )
            except Exception as err:  # noqa: BLE001 - the job fails, the worker goes on
                log.exception("job %s failed", job.job_id)
                message = str(err) if isinstance(err, StemsetError) else f"{type(err).__name__}: {err}"
                self._finish(job, ERROR, message)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker after the job in hand (queued jobs are dropped)."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        """The job, its status brought up to date; None when neither this process nor the
        instance knows it."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            job = self._from_instance(job_id)
            if job is None:
                return None
            with self._lock:
                self._jobs.setdefault(job_id, job)
        if job.via == "webserver" and job.status not in (COMPLETE, ERROR) and job.run_id:
            self._refresh_from_run(job)
        return job

    def _run_for(self, job: Job):
        if job.run_id:
            return self.instance.get_run_by_id(job.run_id)
        runs = self.instance.get_runs(filters=RunsFilter(tags={JOB_TAG: job.job_id}), limit=1)
        return runs[0] if runs else None

    def _from_instance(self, job_id: str) -> Job | None:
        """A job an earlier API process started, from its run's tags."""
        if not job_id.isalnum() or len(job_id) > 64:
            return None
        runs = self.instance.get_runs(filters=RunsFilter(tags={JOB_TAG: job_id}), limit=1)
        if not runs:
            return None
        run = runs[0]
        job = Job(
            job_id=job_id,
            partition=run.tags.get("dagster/partition", ""),
            strategies=[s for s in run.tags.get(STRATEGIES_TAG, "").split(",") if s],
            run_id=run.run_id,
            via="webserver",
        )
        self._refresh_from_run(job)
        return job

    def _refresh_from_run(self, job: Job) -> None:
        run = self._run_for(job)
        if run is None:
            return
        status = _RUN_STATUS.get(run.status.value, RUNNING)
        if status == ERROR:
            self._finish(job, ERROR, self._run_error(run.run_id))
        elif status == COMPLETE:
            self._finish(job, COMPLETE)
        else:
            job.status = status

    def _run_error(self, run_id: str) -> str:
        records = self.instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
        for record in records:
            data = record.event_log_entry.dagster_event.step_failure_data
            if data is not None and data.error is not None:
                return f"{record.event_log_entry.step_key}: {data.error.message.strip()}"
        return f"run {run_id} failed; see it in the Dagster UI"

    def steps(self, job: Job) -> list[dict[str, str]]:
        """The run's steps so far: ``[{step, status}]`` (status: started, success, failure, skipped)."""
        run = self._run_for(job)
        if run is None:
            return []
        out = []
        for stat in self.instance.get_run_step_stats(run.run_id):
            status = stat.status.value.lower() if stat.status is not None else "started"
            out.append({"step": stat.step_key, "status": status})
        return out

    def to_dict(self, job: Job, media_url: Callable[[str], str]) -> dict[str, Any]:
        """The job as the API answers it: ``stems`` (the first strategy's ``{stem: url}``) and
        ``stem_sets`` (every strategy's) once complete."""
        stem_sets: dict[str, dict[str, str]] = {}
        if job.status == COMPLETE:
            for strategy in job.strategies:
                manifest = read_manifest(self.store, job.partition, strategy)
                if manifest is None:
                    self._finish(job, ERROR, f"the run succeeded but the {strategy} stem set has no manifest")
                    break
                stem_sets[strategy] = {name: media_url(stem.key) for name, stem in manifest.stems.items()}
        steps = self.steps(job) if job.status != QUEUED else []
        done = sum(1 for s in steps if s["status"] in ("success", "skipped"))
        total = max(1 + len(job.strategies), len(steps))
        return {
            "job_id": job.job_id,
            "partition": job.partition,
            "strategies": job.strategies,
            "status": job.status,
            "error": job.error if job.status == ERROR else None,
            "stems": next(iter(stem_sets.values()), {}) if job.status == COMPLETE else {},
            "stem_sets": stem_sets,
            "run_id": job.run_id,
            "via": job.via,
            "steps": steps,
            "progress": 1.0 if job.status == COMPLETE else round(min(done / total, 0.99), 3),
            "created_at": job.created_at,
            "finished_at": job.finished_at,
        }


def _materialize_in_worker(
    config: StemsetConfig, partition: str, strategies: list[str], tags: dict[str, str], resources: dict[str, Any] | None
):
    """In the worker process: one run of ``partition`` against the instance of ``$DAGSTER_HOME``
    (inherited from the API process, which set it)."""
    (outcome,) = materialize_in_process(
        config, dagster_instance(config), [partition], strategies, resources=resources, tags=tags
    )
    return outcome

"""The web API's jobs: each job is one Dagster run, and a job's status is read from its run.

A job is launched through the Dagster webserver's GraphQL when ``dagster.webserver_url`` is set
(its run coordinator and daemon own it), else queued in the instance: the run is created
``NOT_STARTED`` in the ``api`` queue (:mod:`stemset_assets.defs.queued_runs`), and a dispatcher
thread hands queued runs one at a time, oldest first, to the job worker process
(:mod:`stemset_assets.api.job_worker`). The queue is the instance's run storage, so jobs outlive
the API process: after a restart the queued runs run, and the job id (the run tag
``stemset/job_id``) finds the run again.

Reconciling, on start and every ``RECONCILE_EVERY_S``: a run of the queue still ``STARTED``
whose worker process is gone is marked failed. A run cut short by the API stopping (or dying) is
queued again once, as a new run of the same job (``stemset/attempt`` 2); a worker that dies while
the API runs (out of memory?) fails its run for good. Every run ends in a terminal state.

Status: ``queued`` (waiting for the worker or the run coordinator), ``running``, ``complete``
(every stem set requested has its manifest), ``error`` (with the run's first failure).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from gpu_worker.errors import StemsetError
from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.layout import read_manifest
from ..defs.queued_runs import create_queued_run, fail_dead_runs, queued_runs
from ..defs.runs import selection_for
from ..defs.webserver import WebserverClient
from .job_worker import JobWorker

log = logging.getLogger(__name__)

JOB_TAG = "stemset/job_id"
STRATEGIES_TAG = "stemset/strategies"
ATTEMPT_TAG = "stemset/attempt"
QUEUE = "api"
MAX_ATTEMPTS = 2  # the first run, and one more after an interruption by the API stopping
RECONCILE_EVERY_S = 30.0
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
WORKER_DIED = (
    "the job worker process died during the job (out of memory?); upload again to retry, and see the API server's log"
)
INTERRUPTED = "the API server stopped during this job"


@dataclass
class Job:
    """A job as read from its newest run."""

    job_id: str
    partition: str
    strategies: list[str]
    status: str
    run_id: str | None
    error: str | None = None
    created_at: float | None = None
    finished_at: float | None = None
    via: str = "in-process"  # or "webserver"


class JobManager:
    """Submits jobs as Dagster runs and reads them back."""

    def __init__(
        self,
        config: StemsetConfig,
        instance: DagsterInstance,
        store: ObjectStore,
        *,
        webserver: WebserverClient | None = None,
        resources: dict[str, Any] | None = None,
        reconcile_every_s: float = RECONCILE_EVERY_S,
    ):
        self.config = config
        self.instance = instance
        self.store = store
        self.webserver = webserver
        self.reconcile_every_s = reconcile_every_s
        self.worker = JobWorker(config, resources)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Reconcile the queue, then dispatch its runs (in-process mode only)."""
        if self.webserver is not None or self._dispatcher is not None:
            return
        self.reconcile()
        self._dispatcher = threading.Thread(target=self._dispatch, name="stemset-api-jobs", daemon=True)
        self._dispatcher.start()

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop dispatching and end the worker process; a run it had in hand is queued again."""
        self._stopping.set()
        self._wake.set()
        self.worker.stop()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout_s)

    def reconcile(self) -> list[str]:
        """Fail the queue's runs whose worker process is gone, and queue each again once; the
        failed run ids."""
        failed = fail_dead_runs(self.instance, QUEUE, f"{INTERRUPTED} (its worker process is gone)")
        for run_id in failed:
            self._retry(self.instance.get_run_by_id(run_id))
        if failed:
            log.warning("reconciled %d run(s) whose worker process was gone: %s", len(failed), ", ".join(failed))
        return failed

    def _dispatch(self) -> None:
        next_reconcile = time.monotonic() + self.reconcile_every_s
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.reconcile_every_s
                runs = queued_runs(self.instance, QUEUE)
                if not runs:
                    self._wake.wait(max(0.1, next_reconcile - time.monotonic()))
                    self._wake.clear()
                    continue
                self._execute(runs[0])
            except Exception:  # noqa: BLE001 - e.g. the instance briefly unavailable; try again
                log.exception("the job dispatcher failed; retrying")
                self._stopping.wait(2.0)

    def _execute(self, run: DagsterRun) -> None:
        status = self.worker.run(run.run_id)
        run = self.instance.get_run_by_id(run.run_id)
        if run is None or run.status == DagsterRunStatus.SUCCESS:
            return
        if self._stopping.is_set():  # cut short by the API stopping (Dagster may have failed it already)
            if not run.is_finished:
                self.instance.report_run_failed(run, f"{INTERRUPTED}; it is queued again")
            self._retry(run)
        elif status is None and not run.is_finished:
            log.error("job worker died during run %s", run.run_id)
            self.instance.report_run_failed(run, WORKER_DIED)

    def _retry(self, run: DagsterRun | None) -> None:
        if run is None or JOB_TAG not in run.tags:
            return
        attempt = int(run.tags.get(ATTEMPT_TAG, "1") or 1)
        if attempt >= MAX_ATTEMPTS:
            return
        tags = {k: run.tags[k] for k in (JOB_TAG, STRATEGIES_TAG) if k in run.tags}
        create_queued_run(
            self.instance,
            self.config,
            run.tags.get("dagster/partition", ""),
            _strategies(run),
            {**tags, ATTEMPT_TAG: str(attempt + 1)},
            QUEUE,
            parent_run_id=run.run_id,
        )

    # ------------------------------------------------------------------ submitting

    def submit(self, partition: str, strategies: list[str]) -> Job:
        """A new job for ``partition``: its run is in the instance before this returns.
        Raises StemsetError when the webserver refuses it."""
        job_id = uuid.uuid4().hex[:16]
        tags = {JOB_TAG: job_id, STRATEGIES_TAG: ",".join(strategies), ATTEMPT_TAG: "1"}
        if self.webserver is not None:
            self.webserver.launch_run(partition, selection_for(self.config, strategies), tags=tags)
        else:
            create_queued_run(self.instance, self.config, partition, strategies, tags, QUEUE)
            self._wake.set()
        job = self.get(job_id)
        if job is None:
            raise StemsetError(f"The run of job {job_id} is not in the Dagster instance.", "See the API's log.")
        return job

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        """The job as its newest run says; None when no run carries its id."""
        if not job_id.isalnum() or len(job_id) > 64:
            return None
        runs = self.instance.get_runs(filters=RunsFilter(tags={JOB_TAG: job_id}), limit=1)
        if not runs:
            return None
        run = runs[0]
        record = self.instance.get_run_record_by_id(run.run_id)
        status = _RUN_STATUS.get(run.status.value, RUNNING)
        return Job(
            job_id=job_id,
            partition=run.tags.get("dagster/partition", ""),
            strategies=_strategies(run),
            status=status,
            run_id=run.run_id,
            error=self._run_error(run.run_id) if status == ERROR else None,
            created_at=record.create_timestamp.timestamp() if record else None,
            finished_at=record.end_time if record and run.is_finished else None,
            via="in-process" if run.tags.get("stemset/queue") == QUEUE else "webserver",
        )

    def _run_error(self, run_id: str) -> str:
        """The first step failure's message, else the run failure's."""
        records = self.instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
        for record in records:
            data = record.event_log_entry.dagster_event.step_failure_data
            if data is not None and data.error is not None:
                return f"{record.event_log_entry.step_key}: {data.error.message.strip()}"
        records = self.instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_FAILURE).records
        for record in records:
            message = record.event_log_entry.dagster_event.message or ""
            if message:
                return message.strip()
        return f"run {run_id} failed; see it in the Dagster UI"

    def steps(self, job: Job) -> list[dict[str, str]]:
        """The run's steps so far: ``[{step, status}]`` (status: started, success, failure, skipped)."""
        if job.run_id is None:
            return []
        out = []
        for stat in self.instance.get_run_step_stats(job.run_id):
            status = stat.status.value.lower() if stat.status is not None else "started"
            out.append({"step": stat.step_key, "status": status})
        return out

    def to_dict(self, job: Job, media_url: Callable[[str], str]) -> dict[str, Any]:
        """The job as the API answers it: ``stems`` (the first strategy's ``{stem: url}``) and
        ``stem_sets`` (every strategy's) once complete."""
        stem_sets: dict[str, dict[str, str]] = {}
        status, error = job.status, job.error
        if status == COMPLETE:
            for strategy in job.strategies:
                manifest = read_manifest(self.store, job.partition, strategy)
                if manifest is None:
                    status, error = ERROR, f"the run succeeded but the {strategy} stem set has no manifest"
                    stem_sets = {}
                    break
                stem_sets[strategy] = {name: media_url(stem.key) for name, stem in manifest.stems.items()}
        steps = self.steps(job) if status != QUEUED else []
        done = sum(1 for s in steps if s["status"] in ("success", "skipped"))
        total = max(1 + len(job.strategies), len(steps))
        return {
            "job_id": job.job_id,
            "partition": job.partition,
            "strategies": job.strategies,
            "status": status,
            "error": error if status == ERROR else None,
            "stems": next(iter(stem_sets.values()), {}),
            "stem_sets": stem_sets,
            "run_id": job.run_id,
            "via": job.via,
            "steps": steps,
            "progress": 1.0 if status == COMPLETE else round(min(done / total, 0.99), 3),
            "created_at": job.created_at,
            "finished_at": job.finished_at,
        }


def _strategies(run: DagsterRun) -> list[str]:
    return [s for s in run.tags.get(STRATEGIES_TAG, "").split(",") if s]

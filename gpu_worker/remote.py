"""The worker side of the remote backends (HTTP and Modal), in plain Python.

- :class:`WarmWorker` keeps models loaded between jobs, fills in the worker's own defaults
  (model folder, GPU type) and charges the time it spent getting ready to the first job it runs.
- Error envelopes: a job that fails with a :class:`~gpu_worker.errors.StemsetError` (bad input,
  unknown model, unreadable bucket) is answered with ``{"error": {"type", "message"}}`` instead of a
  result. :func:`error_from_info` turns that back into the same exception class on the caller's
  side, message verbatim, so a remote failure reads exactly like a local one.
- Job runners behind the HTTP app: :class:`ThreadJobRunner` runs jobs in this process on a small
  thread pool (one at a time by default: one GPU, one job); :class:`SpawnJobRunner` hands them to a
  spawn/poll pair (the Modal web endpoint wires it to ``Separator.separate.spawn``). Both are
  idempotent by job id: submitting a job id again returns the existing job, never a second run.

Nothing here imports torch, Starlette or Modal at module level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from . import errors as _errors
from . import models
from .errors import JobError, StemsetError
from .job import SeparationJob, SeparationResult

log = logging.getLogger(__name__)

DEFAULT_PRELOAD = ("htdemucs",)
STATUSES = ("queued", "running", "complete", "error")


class WorkerError(StemsetError):
    """The GPU worker failed in a way that is not the job's fault (a crash, an unexpected exception)."""


class JobConflictError(JobError):
    """A job id was submitted again with a different payload."""


# --------------------------------------------------------------------------------------
# Error envelopes
# --------------------------------------------------------------------------------------


def _stemset_error_classes() -> dict[str, type[StemsetError]]:
    found: dict[str, type[StemsetError]] = {}
    for module_vars in (vars(_errors), globals()):
        for name, value in module_vars.items():
            if isinstance(value, type) and issubclass(value, StemsetError):
                found[name] = value
    return found


def error_info(err: BaseException) -> dict[str, str]:
    """``{"type", "message"}`` for an exception: a StemsetError keeps its class name and whole
    message; anything else becomes a WorkerError naming the exception type."""
    if isinstance(err, StemsetError):
        return {"type": type(err).__name__, "message": str(err)}
    text = str(err).strip() or "(no message)"
    return {"type": "WorkerError", "message": f"The GPU worker failed with an unexpected {type(err).__name__}: {text}"}


def error_from_info(info: Any) -> StemsetError:
    """The exception an error envelope describes: the same StemsetError class when it is one of
    Stemset's (AudioError, ModelError, StorageError, ...), else a WorkerError; message verbatim."""
    if not isinstance(info, dict):
        return WorkerError(f"The GPU worker reported an error it did not describe: {info!r}.")
    message = str(info.get("message") or "The GPU worker reported an error without a message.")
    cls = _stemset_error_classes().get(str(info.get("type")), WorkerError)
    return cls(message)  # the message already carries the hint


def error_envelope(err: BaseException, job_id: str | None = None) -> str:
    payload: dict[str, Any] = {"error": error_info(err)}
    if job_id:
        payload["job_id"] = job_id
    return json.dumps(payload, sort_keys=True)


def decode_response(text: str | bytes) -> SeparationResult:
    """A worker's answer (result JSON or error envelope) as a result, or the error raised."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise WorkerError(f"The GPU worker answered with something that is not JSON: {err}.") from None
    if isinstance(data, dict) and "error" in data and "stems" not in data:
        raise error_from_info(data["error"])
    if not isinstance(data, dict):
        raise WorkerError("The GPU worker answered with JSON that is not an object.")
    return SeparationResult.from_dict(data)


def job_digest(job: SeparationJob) -> str:
    """What makes two submissions of one job id "the same job"."""
    return hashlib.sha256(job.to_json().encode()).hexdigest()


# --------------------------------------------------------------------------------------
# A warm worker
# --------------------------------------------------------------------------------------


def _env_models(value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_PRELOAD
    return tuple(name.strip() for name in value.split(",") if name.strip())


class WarmWorker:
    """Runs jobs with models kept in memory between them.

    ``preload()`` loads ``preload_models`` on the CPU (safe before a memory snapshot: no CUDA),
    ``to_device()`` moves them to the GPU. The seconds those steps took are charged to the next
    job :meth:`run` executes (``timings["startup"]``, included in ``billed_seconds``), so the
    first job of a container pays for the container getting ready and later jobs do not.
    """

    def __init__(
        self,
        *,
        backend: str,
        model_repo: str | None = None,
        preload_models: Iterable[str] = DEFAULT_PRELOAD,
        gpu_type: str | None = None,
        device: str = "auto",
    ):
        self.backend = backend
        self.model_repo = model_repo or None
        self.preload_models = tuple(preload_models)
        self.gpu_type = gpu_type or None
        self.device = device
        self._pending_startup_s = 0.0
        self._lock = threading.Lock()
        self._pipeline = None
        # Option A: a function that finishes a handoff document elsewhere (the Modal app sets it to
        # the CPU-only Finisher) and answers the result JSON or an error envelope.
        self.finish_remote: Callable[[str], str] | None = None

    @classmethod
    def from_env(cls, *, backend: str, gpu_type: str | None = None) -> WarmWorker:
        """Settings from ``STEMSET_MODEL_REPO`` (a Demucs repo folder on this machine; empty =
        Demucs' download), ``STEMSET_PRELOAD_MODELS`` (comma-separated, default ``htdemucs``;
        empty = none) and ``STEMSET_GPU_TYPE``."""
        return cls(
            backend=backend,
            model_repo=os.environ.get("STEMSET_MODEL_REPO") or None,
            preload_models=_env_models(os.environ.get("STEMSET_PRELOAD_MODELS")),
            gpu_type=gpu_type or os.environ.get("STEMSET_GPU_TYPE") or None,
        )

    def __repr__(self) -> str:
        return (
            f"WarmWorker(backend={self.backend!r}, model_repo={self.model_repo!r}, "
            f"preload_models={self.preload_models!r}, gpu_type={self.gpu_type!r})"
        )

    def charge_startup(self, seconds: float) -> None:
        """Add ``seconds`` to what the next job is billed for getting this worker ready."""
        with self._lock:
            self._pending_startup_s += max(0.0, float(seconds))

    def preload(self) -> float:
        """Load the preload models on the CPU; the seconds it took (not charged: see charge_startup)."""
        t0 = time.perf_counter()
        for name in self.preload_models:
            models.load_model(name, self.model_repo)
        return time.perf_counter() - t0

    def to_device(self) -> float:
        """Move the preloaded models to this worker's device (the GPU when there is one); seconds."""
        from .inference import pick_device  # lazy: torch (~1.5 s) is not needed to serve routes or deploy

        t0 = time.perf_counter()
        device = pick_device(self.device)
        if device.type != "cpu":
            for name in self.preload_models:
                models.load_model(name, self.model_repo).to(device)
            if device.type == "cuda":
                import torch  # lazy, as above

                torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def prepare(self, job: SeparationJob) -> SeparationJob:
        """The job with this worker's defaults: its model folder when the job names none, the GPU
        type it runs on (what the job asked for is only a wish), and ``STEMSET_S3_ENDPOINT_URL``
        for an s3 storage reference that names no endpoint."""
        changes: dict[str, Any] = {}
        if job.model_repo and job.model_repo != self.model_repo:
            # Loading a model unpickles files: a client may not point the worker at any folder.
            raise JobError(
                f"This worker loads models only from its own folder (STEMSET_MODEL_REPO="
                f"{self.model_repo or 'unset: Demucs download'}), not {job.model_repo[:200]!r}: "
                "send the job without model_repo, or set STEMSET_MODEL_REPO on the worker."
            )
        if self.model_repo:
            changes["model_repo"] = self.model_repo
        if self.gpu_type:
            changes["gpu_type"] = self.gpu_type
        endpoint = os.environ.get("STEMSET_S3_ENDPOINT_URL") or None
        if endpoint:
            for name in ("storage", "output_storage"):
                ref = getattr(job, name)
                if ref is not None and ref.backend == "s3" and not ref.endpoint_url:
                    changes[name] = replace(ref, endpoint_url=endpoint)
        return replace(job, **changes) if changes else job

    def pipeline(self):
        """This worker's :class:`~gpu_worker.pipeline.JobPipeline`, made on first use: jobs that
        arrive together (HTTP runner threads, Modal inputs of a concurrent container) share one
        device stage, so the device separates the next song while the last is encoded."""
        from .pipeline import JobPipeline  # lazy: the audio stack is not needed to serve routes or deploy

        with self._lock:
            if self._pipeline is None:
                self._pipeline = JobPipeline()
            return self._pipeline

    def run(self, job: SeparationJob, progress: Callable[[float], None] | None = None) -> SeparationResult:
        with self._lock:
            startup, self._pending_startup_s = self._pending_startup_s, 0.0
        try:
            handoff = job.finish_on == "cpu_function" and self.finish_remote is not None
            future = self.pipeline().submit(
                self.prepare(job), progress=progress, backend=self.backend, startup_s=startup, handoff=handoff
            )
            outcome = future.result()
            if isinstance(outcome, str):  # a handoff document: the CPU function finishes it
                return decode_response(self.finish_remote(outcome))
            return outcome
        except BaseException:
            self.charge_startup(startup)  # nothing was billed: the next job carries it
            raise

    def handle_json(self, job_json: str) -> str:
        """Run a job given as JSON: the result JSON, or an error envelope for a Stemset error
        (a bad job or input, which a retry would not fix). Unexpected exceptions propagate, so
        the platform can retry them."""
        try:
            job = SeparationJob.from_json(job_json)
        except StemsetError as err:
            return error_envelope(err)
        try:
            return self.run(job).to_json()
        except StemsetError as err:
            log.warning("job %s failed: %s", job.job_id, err)
            return error_envelope(err, job.job_id)


def finish_handoff_json(handoff_json: str) -> str:
    """The CPU function's side of Option A: finish a handoff document (gpu_worker.handoff); the
    result JSON, or an error envelope for a Stemset error."""
    from .handoff import finish_handoff  # lazy: the audio stack

    try:
        return finish_handoff(handoff_json).to_json()
    except StemsetError as err:
        log.warning("handoff failed: %s", err)
        return error_envelope(err)


# --------------------------------------------------------------------------------------
# Job runners (the HTTP app's backends)
# --------------------------------------------------------------------------------------


@dataclass
class JobRecord:
    job_id: str
    digest: str
    status: str = "queued"
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    call_id: str | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "call_id": self.call_id or self.job_id,
            "status": self.status,
            "progress": round(self.progress, 3),
        }
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class ThreadJobRunner:
    """Runs jobs in this process, ``max_concurrent`` at a time, in submission order; the worker's
    pipeline overlaps them (one on the device, the others decoding or being encoded), so 4 in
    flight keep one GPU busy while its memory stays bounded by the pipeline's queues. State lives in memory: a restarted worker forgets its jobs, and a
    client that resubmits the same job id gets it run anew (its output is published only whole)."""

    def __init__(self, worker: WarmWorker, max_concurrent: int = 4, keep: int = 1000):
        self.worker = worker
        self.keep = max(1, int(keep))
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(max_concurrent)), thread_name_prefix="stemset-job")
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()

    def submit(self, job: SeparationJob) -> tuple[JobRecord, bool]:
        """``(record, created)``; an existing job id returns its record (created False)."""
        digest = job_digest(job)
        with self._lock:
            existing = self._jobs.get(job.job_id)
            if existing is not None:
                if existing.digest != digest:
                    raise JobConflictError(
                        f"Job id {job.job_id!r} was already submitted with a different payload.",
                        "Give a changed job a new id; resubmit an unchanged job with the same id.",
                    )
                return existing, False
            record = JobRecord(job_id=job.job_id, digest=digest, submitted_at=time.time())
            self._jobs[job.job_id] = record
            self._forget_old()
        self._pool.submit(self._run, record, job)
        return record, True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    get_call = get  # here a call id is the job id

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = {status: 0 for status in STATUSES}
            for record in self._jobs.values():
                counts[record.status] += 1
            return counts

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, record: JobRecord, job: SeparationJob) -> None:
        def progress(fraction: float) -> None:
            record.progress = max(record.progress, float(fraction))

        record.status, record.started_at = "running", time.time()
        try:
            result = self.worker.run(job, progress=progress)
        except BaseException as err:  # noqa: BLE001 - every failure is reported to the client
            if not isinstance(err, StemsetError):
                log.exception("job %s failed unexpectedly", job.job_id)
            else:
                log.warning("job %s failed: %s", job.job_id, err)
            record.error, record.status = error_info(err), "error"
        else:
            record.result, record.progress, record.status = result.to_dict(), 1.0, "complete"
        finally:
            record.finished_at = time.time()

    def _forget_old(self) -> None:
        finished = [r for r in self._jobs.values() if r.status in ("complete", "error")]
        excess = len(self._jobs) - self.keep
        for record in sorted(finished, key=lambda r: r.finished_at or 0)[: max(0, excess)]:
            del self._jobs[record.job_id]


Poll = Callable[[str], "tuple[str, str | None]"]


class SpawnJobRunner:
    """Jobs handed to a platform's spawn/poll pair (the Modal web endpoint uses the Separator's
    ``.spawn`` and ``FunctionCall.get(timeout=0)``).

    - ``spawn(job_json) -> call_id`` starts one call;
    - ``poll(call_id) -> (state, payload)``: ``("pending", None)``, ``("complete", answer)`` with
      the worker's answer (result JSON or error envelope), ``("expired", None)`` when the platform
      no longer holds the answer, or ``("error", message)``;
    - ``index`` maps job ids to ``{"call_id", "digest"}`` across processes (a ``modal.Dict``, or
      any object with ``get(key, default)`` and ``put(key, value, skip_if_exists=True) -> bool``);
    - ``cancel(call_id)`` stops a call that lost a race for the same job id.
    """

    def __init__(
        self, spawn: Callable[[str], str], poll: Poll, index: Any, cancel: Callable[[str], None] | None = None
    ):
        self.spawn, self.poll, self.index, self.cancel = spawn, poll, index, cancel

    def submit(self, job: SeparationJob) -> tuple[JobRecord, bool]:
        digest = job_digest(job)
        entry = self.index.get(job.job_id, None)
        if entry is not None:
            self._check_digest(job.job_id, entry, digest)
            record = self.get_call(entry["call_id"], job_id=job.job_id)
            if not (record.status == "error" and (record.error or {}).get("type") == "ExpiredError"):
                return record, False
        call_id = self.spawn(job.to_json())
        value = {"call_id": call_id, "digest": digest}
        if entry is not None:  # the old call's result expired: this one replaces it
            self.index[job.job_id] = value
        elif not self.index.put(job.job_id, value, skip_if_exists=True):
            # Another submission of this job id won the race: keep its call, stop ours.
            if self.cancel is not None:
                try:
                    self.cancel(call_id)
                except Exception:  # noqa: BLE001 - best effort
                    log.warning("could not cancel duplicate call %s", call_id)
            entry = self.index.get(job.job_id, None) or value
            self._check_digest(job.job_id, entry, digest)
            return self.get_call(entry["call_id"], job_id=job.job_id), False
        return JobRecord(
            job_id=job.job_id, digest=digest, status="queued", call_id=call_id, submitted_at=time.time()
        ), True

    def get(self, job_id: str) -> JobRecord | None:
        entry = self.index.get(job_id, None)
        if entry is None:
            return None
        return self.get_call(entry["call_id"], job_id=job_id)

    def get_call(self, call_id: str, job_id: str | None = None) -> JobRecord:
        state, payload = self.poll(call_id)
        record = JobRecord(job_id=job_id or call_id, digest="", call_id=call_id)
        if state == "pending":
            record.status = "running"
        elif state == "complete":
            try:
                result = decode_response(payload or "")
            except StemsetError as err:
                record.status, record.error = "error", error_info(err)
            else:
                record.status, record.result, record.progress = "complete", result.to_dict(), 1.0
                record.job_id = job_id or result.job_id
        elif state == "expired":
            record.status = "error"
            record.error = {
                "type": "ExpiredError",
                "message": f"The result of call {call_id} has expired; submit the job again.",
            }
        else:
            record.status, record.error = "error", {"type": "WorkerError", "message": str(payload)}
        return record

    def stats(self) -> dict[str, int]:
        return {}

    def shutdown(self) -> None:
        pass

    @staticmethod
    def _check_digest(job_id: str, entry: dict[str, Any], digest: str) -> None:
        if entry.get("digest") and entry["digest"] != digest:
            raise JobConflictError(
                f"Job id {job_id!r} was already submitted with a different payload.",
                "Give a changed job a new id; resubmit an unchanged job with the same id.",
            )

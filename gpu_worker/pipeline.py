"""A backlog of jobs through the three stages at once: the device never waits for the CPU.

::

    submit() -> [fetch thread(s)] -prefetch slots-> [device thread] -bounded queue-> [finish threads]
                 download, decode                    separate           analyse + encode (stems in
                                                                        parallel), stage, publish

While song k is measured, encoded and published on CPU threads, the device separates song
k+1 and the next input is already decoded. Memory stays flat however long the backlog: at
most ``prefetch`` decoded inputs wait for the device, ``depth`` separated songs wait for a
finisher, and ``finish_workers`` are being finished (:attr:`JobPipeline.bound` songs in all).
Every stage is the function :func:`gpu_worker.worker.run_job` calls, so a pipelined job's stems
and manifest equal a serial run's. A job that fails in any stage fails alone: its future holds
the error, nothing of it is published, the others go on.

Billing: a job is charged the seconds the device was reserved for it (``timings["held"]``,
``billed_seconds``), not its latency. :class:`DeviceClock` tiles the device's busy time: job k
holds the device from when it began on it (or, when the device had to wait for it, from when
the device became free or the job arrived) until the device began job k+1, or until job k was
published if that came first. The shares add up to the pipeline's busy wall time. Process CPU
seconds are cut at the same instants (``timings["cpu"]``), so in a steady backlog each song
carries the CPU work done while it held the device.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import StemsetError
from .handoff import write_handoff
from .job import SeparationJob, SeparationResult
from .stages import Encoder, JobState, Observer, Progress, cpu_seconds, fetch, finish, separate
from .stores.base import ObjectStore

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Request:
    job: SeparationJob
    kwargs: dict[str, Any]
    future: Future
    handoff: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cpu_submitted: float = field(default_factory=cpu_seconds)


class DeviceClock:
    """Which share of the device's time (and of the process's CPU time) each job is billed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prev: JobState | None = None

    def begin(self, state: JobState, submitted: float, cpu_submitted: float) -> None:
        """``state`` starts on the device now."""
        now, cpu = time.perf_counter(), cpu_seconds()
        with self._lock:
            prev = self._prev
            if prev is not None and prev.released_at is None:
                prev.next_begin = (now, cpu)  # the previous job holds the device until now
                start = (now, cpu)
            else:  # the device was free: this job holds it from when it was both free and asked for
                free = prev.released_at if prev is not None else None
                start = max(free, (submitted, cpu_submitted)) if free is not None else (submitted, cpu_submitted)
            state.hold_from = start
            self._prev = state
        state.release = self.release

    def release(self, state: JobState) -> tuple[float, float]:
        """``(held seconds, CPU seconds)`` of ``state``, which is being published now."""
        now, cpu = time.perf_counter(), cpu_seconds()
        with self._lock:
            end = state.next_begin or (now, cpu)
            state.released_at = end
        start = state.hold_from or end
        return max(0.0, end[0] - start[0]), max(0.0, end[1] - start[1])


FINISH_WORKERS_ENV = "STEMSET_FINISH_WORKERS"


def default_finish_workers(cores: float | None = None) -> int:
    """Songs finished at once: ``STEMSET_FINISH_WORKERS``, else one per four cores (a song's four
    stems encode in parallel, so fewer songs would leave cores idle while the device waits)."""
    raw = os.environ.get(FINISH_WORKERS_ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise ValueError(f"{FINISH_WORKERS_ENV}={raw!r} is not a whole number.") from None
    return max(1, int((cores or os.cpu_count() or 1) // 4))


class JobPipeline:
    """Runs jobs through fetch -> separate -> finish on their own threads (see the module doc).

    ``prefetch``: decoded inputs that may wait for the device (1: the next song is ready when
    the device frees up). ``depth``: separated songs that may wait for a finisher.
    ``finish_workers``: songs finished at once (several when the cores outnumber one song's four
    stems: :func:`default_finish_workers`). ``encode_threads``: the pool the stems of the songs
    being finished are measured, encoded and uploaded on (default: the CPU count, at most four
    per finishing song).
    ``encode`` replaces the encoder (tests: a slow or failing one); ``observer`` hears every
    stage mark ``(job_id, mark, time)``.
    """

    def __init__(
        self,
        *,
        prefetch: int = 1,
        depth: int = 1,
        finish_workers: int | None = None,
        encode_threads: int | None = None,
        encode: Encoder | None = None,
        observer: Observer | None = None,
    ):
        self.prefetch, self.depth = max(1, prefetch), max(1, depth)
        self.finish_workers = max(1, finish_workers or default_finish_workers())
        self.encode, self.observer = encode, observer
        self.clock = DeviceClock()
        self._incoming: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self.prefetch)
        self._decoded: queue.Queue = queue.Queue()
        self._separated: queue.Queue = queue.Queue(maxsize=self.depth)
        threads = encode_threads or min(os.cpu_count() or 1, 4 * self.finish_workers)  # 4 stems a song
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="stemset-encode")
        self._live = 0
        self.max_live = 0  # the most jobs held in memory at once (tests check it against bound)
        self._live_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._fetch_loop, name="stemset-fetch", daemon=True),
            threading.Thread(target=self._device_loop, name="stemset-device", daemon=True),
        ] + [
            threading.Thread(target=self._finish_loop, name=f"stemset-finish-{i}", daemon=True)
            for i in range(self.finish_workers)
        ]
        for thread in self._threads:
            thread.start()
        self._closed = False

    @property
    def bound(self) -> int:
        """The most jobs whose audio is in memory at once."""
        return self.prefetch + 1 + self.depth + self.finish_workers

    def submit(
        self,
        job: SeparationJob,
        *,
        store: ObjectStore | None = None,
        output_store: ObjectStore | None = None,
        progress: Progress | None = None,
        backend: str = "local",
        startup_s: float = 0.0,
        handoff: bool = False,
    ) -> Future:
        """Queue ``job``; a future of its :class:`SeparationResult` (or its exception). With
        ``handoff`` the last stage writes the stems for a CPU function instead
        (:func:`gpu_worker.handoff.write_handoff`) and the future holds the handoff document
        (a JSON string), except for a streamed input, which is finished here as usual."""
        if self._closed:
            raise RuntimeError("The job pipeline is closed.")
        future: Future = Future()
        kwargs = {
            "store": store,
            "output_store": output_store,
            "progress": progress,
            "backend": backend,
            "startup_s": startup_s,
        }
        self._incoming.put(_Request(job, kwargs, future, handoff))
        return future

    def run_many(self, jobs: Sequence[SeparationJob], **kwargs: Any) -> list[SeparationResult | Exception]:
        """Run ``jobs``; each one's result or, for a job that failed with a Stemset error, that
        error in its place (anything else raises once all have ended)."""
        futures = [self.submit(job, **kwargs) for job in jobs]
        out: list[SeparationResult | Exception] = []
        unexpected: BaseException | None = None
        for future in futures:
            err = future.exception()
            if err is None:
                out.append(future.result())
            elif isinstance(err, StemsetError):
                out.append(err)
            else:
                out.append(err)  # type: ignore[arg-type]
                unexpected = unexpected or err
        if unexpected is not None:
            raise unexpected
        return out

    def close(self) -> None:
        """Finish the queued jobs, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._incoming.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> JobPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the stages' threads ---------------------------------------------------------------

    def _fetch_loop(self) -> None:
        while True:
            request = self._incoming.get()
            if request is _STOP:
                self._decoded.put(_STOP)
                return
            self._slots.acquire()  # released when the device takes the job
            if not request.future.set_running_or_notify_cancel():
                self._slots.release()
                continue
            self._hold(+1)
            try:
                state = fetch(request.job, observer=self.observer, **request.kwargs)
            except BaseException as err:  # noqa: BLE001 - the job's own failure
                self._hold(-1)
                self._slots.release()
                request.future.set_exception(err)
                continue
            self._decoded.put((request, state))

    def _device_loop(self) -> None:
        while True:
            item = self._decoded.get()
            if item is _STOP:
                for _ in range(self.finish_workers):
                    self._separated.put(_STOP)
                return
            request, state = item
            self._slots.release()
            self.clock.begin(state, request.submitted, request.cpu_submitted)
            try:
                separate(state)
            except BaseException as err:  # noqa: BLE001 - the job's own failure
                self.clock.release(state)
                self._drop(state)
                request.future.set_exception(err)
                continue
            self._separated.put((request, state))  # blocks while `depth` songs wait: memory stays flat

    def _finish_loop(self) -> None:
        while True:
            item = self._separated.get()
            if item is _STOP:
                return
            request, state = item
            try:
                if request.handoff and state.stems is not None:  # a streamed input is already encoded
                    result = write_handoff(state)
                else:
                    result = finish(state, pool=self._pool, encode=self.encode)
            except BaseException as err:  # noqa: BLE001 - the job's own failure
                if state.released_at is None:
                    self.clock.release(state)
                log.warning("job %s failed: %s", request.job.job_id, err)
                request.future.set_exception(err)
            else:
                request.future.set_result(result)
            finally:
                self._drop(state)

    def _hold(self, n: int) -> None:
        with self._live_lock:
            self._live += n
            self.max_live = max(self.max_live, self._live)

    def _drop(self, state: JobState) -> None:
        state.close()
        self._hold(-1)

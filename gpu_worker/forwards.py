"""Model forwards over a sequence of batches, answered in order.

On a GPU one forward follows the next (a batch already fills the device). On a CPU, several
forwards may run at once, each on its own thread with ``cores / forwards`` intra-op threads:
where one forward spread over many cores scales poorly, that keeps every core on work of its own.
The callers' overlap-add consumes the outputs in the same order as a serial run, so the result
is the serial one up to the kernels' thread-count rounding (~1e-7).

``STEMSET_CPU_FORWARDS`` sets how many run at once on a CPU (default 1: one forward over all
cores; never more than one per core). Each extra forward holds its own activations: on the
2-core test machine two forwards gained 3% wall time against the Demucs CLI and cost 70% more
peak memory (benchmarks/RESULTS.md), so it is a setting for many-core hosts with memory to spare.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .errors import ConfigError
from .inference import EngineStats, autocast

CPU_FORWARDS_ENV = "STEMSET_CPU_FORWARDS"
DEFAULT_CPU_FORWARDS = 1

B = TypeVar("B", bound=Sequence[Any])

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def cpu_forwards(environ: Mapping[str, str] = os.environ) -> int:
    """How many forwards run at once on the CPU: the environment's choice or the default,
    never more than the intra-op threads torch would use (one per core)."""
    raw = environ.get(CPU_FORWARDS_ENV, "").strip()
    if raw:
        try:
            wanted = int(raw)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ConfigError(
                f"{CPU_FORWARDS_ENV}={raw[:20]!r} is not a whole number of at least 1.",
                f"Set {CPU_FORWARDS_ENV} to e.g. 1 (one forward over all cores) or 2, or unset it.",
            )
    else:
        wanted = DEFAULT_CPU_FORWARDS
    return max(1, min(wanted, torch.get_num_threads()))


def run_forwards(
    model: Any,
    batches: Iterable[B],
    make_input: Callable[[B], torch.Tensor],
    device: torch.device,
    precision: str,
    stats: EngineStats,
) -> Iterator[tuple[B, torch.Tensor]]:
    """``(batch, float32 output)`` for each batch, in the order given.

    ``make_input`` runs on the calling thread, just before its forward is started (it may read
    from a non-thread-safe source); at most as many inputs and outputs are alive as forwards run
    at once. ``stats`` counts batches and segments, and ``forward_s`` adds each forward's own time.
    """
    workers = cpu_forwards() if device.type == "cpu" else 1
    if workers == 1:
        for batch in batches:
            y, seconds = _forward(model, make_input(batch), device, precision)
            yield batch, _count(stats, batch, y, seconds)
            del y  # not alive during the next forward (see the engine's loop)
        return
    pool = _pool(workers, max(1, torch.get_num_threads() // workers))
    pending: deque[tuple[B, Future]] = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(_forward, model, make_input(batch), device, precision)))
            if len(pending) >= workers:
                done, future = pending.popleft()
                yield done, _count(stats, done, *future.result())
                del future  # its output, not alive while the next forward starts
        while pending:
            done, future = pending.popleft()
            yield done, _count(stats, done, *future.result())
            del future
    finally:
        for _, future in pending:  # the caller stopped early (an error): no forward outlives the call
            future.cancel()
            if not future.cancelled():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - the caller's own error is the one to report
                    pass


def _forward(model: Any, x: torch.Tensor, device: torch.device, precision: str) -> tuple[torch.Tensor, float]:
    # inference_mode and autocast are per thread: entered here, on the thread that runs the model.
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        y = model(x)
    return y.float(), time.perf_counter() - t0


def _count(stats: EngineStats, batch: Sequence[Any], y: torch.Tensor, seconds: float) -> torch.Tensor:
    stats.forward_s += seconds
    stats.batches += 1
    stats.segments += len(batch)
    return y


def _pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """A pool kept for the process: its threads keep their intra-op setting and oneDNN's caches."""
    with _pools_lock:
        pool = _pools.get((workers, threads))
        if pool is None:
            mine = torch.get_num_threads()
            pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix="stemset-forward",
                initializer=_set_thread_count,
                initargs=(threads,),
            )
            # torch also keeps a worker's count as the default that threads started later take up:
            # start every worker now, then put the default back, so no other thread runs on one core.
            started = threading.Barrier(workers + 1)
            for _ in range(workers):
                pool.submit(started.wait, 60)
            started.wait(60)
            torch.set_num_threads(mine)
            _pools[(workers, threads)] = pool
        return pool


def _set_thread_count(threads: int) -> None:
    # torch sets a thread's OpenMP count from its process default on the thread's first parallel
    # op; take that step first, or it would later undo the count set here.
    torch.get_num_threads()
    torch.set_num_threads(threads)  # this thread's count, and the process default (restored after)

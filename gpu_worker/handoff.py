"""Option A of where the CPU stages run: the GPU function hands the separated stems on, lossless,
to a CPU-only function that measures, encodes and publishes them, so the GPU is released as soon
as the stems are written.

:func:`write_handoff` (on the GPU container, after :func:`~gpu_worker.stages.separate`) writes each
stem as raw float32 (``(channels, frames)``, C order: bit-exact, no codec) under the job's staging
folder (``<prefix>/.staging/<job_id>/handoff/``) and answers a small JSON document with everything
:func:`~gpu_worker.stages.finish` needs; :func:`finish_handoff` (on the CPU function) reads them
back and runs the same ``finish`` stage as every other path, so the stems and manifest equal a
direct run's. The device seconds billed are those the GPU side held (``timings["held"]``); the CPU
seconds are both sides' (``timings["cpu"]``; the CPU function's alone in ``timings["cpu_function"]``).
The handoff objects are deleted once the set is published (best effort).

The price of this option is the transfer: 4 stems x 2 channels x 4 bytes x 44,100 per second of
audio, 339 MB for a 4-minute song, written by the GPU container and read by the CPU function
(benchmarks/RESULTS.md, README "Cost" for the measured comparison with Option B).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Executor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .audio.analyse import residual_db
from .audio.info import CHANNELS
from .errors import JobError, StorageError
from .job import SeparationJob, SeparationResult
from .stages import (
    Encoder,
    JobState,
    cpu_seconds,
    finish,
    open_store,
    stem_key,
)
from .stores.base import ObjectStore
from .stores.publish import staging_key
from .strategy import parse_strategy

log = logging.getLogger(__name__)

HANDOFF_VERSION = 1


def handoff_key(job: SeparationJob, stem: str) -> str:
    return staging_key(stem_key(job, stem), job.job_id).rsplit("/", 1)[0] + f"/handoff/{stem}.f32"


def write_handoff(state: JobState) -> str:
    """Write ``state``'s separated stems to the output store; the handoff document (JSON)."""
    if state.stems is None:
        raise JobError(
            f"Job {state.job.job_id}: a streamed (long) input is encoded on the device side; it cannot be handed off.",
            "Long inputs always finish where they were separated.",
        )
    t0 = time.perf_counter()
    job, store = state.job, state.out_store
    residual = residual_db(state.wav, list(state.stems.values()))
    state.wav = None
    keys = {}
    for name, stem in state.stems.items():
        path = state.tmpdir / f"{name}.f32"
        np.ascontiguousarray(stem, dtype=np.float32).tofile(path)
        keys[name] = handoff_key(job, name)
        store.upload(path, keys[name])
        path.unlink()
    state.timings["handoff"] = time.perf_counter() - t0
    state.timings["total"] = time.perf_counter() - state.started
    if state.release is not None:
        held, cpu = state.release(state)
    else:
        held, cpu = state.timings["total"], cpu_seconds() - state.cpu_started
    doc = {
        "version": HANDOFF_VERSION,
        "job": json.loads(job.to_json()),
        "keys": keys,
        "frames": int(next(iter(state.stems.values())).shape[-1]),
        "channels": CHANNELS,
        "sha256": state.sha,
        "duration_s": state.info.duration_s,
        "residual_db": residual,
        "timings": state.timings,
        "held_s": held,
        "cpu_s": cpu,
        "startup_s": state.startup_s,
        "segments": state.stats.segments,
        "batches": state.stats.batches,
        "device_type": state.device.type,
        "device": _device_label(state.device),
        "gpu_peak_mb": state.gpu_peak_mb,
        "backend": state.backend,
    }
    return json.dumps(doc, sort_keys=True)


def finish_handoff(
    handoff_json: str | bytes,
    *,
    store: ObjectStore | None = None,
    pool: Executor | None = None,
    encode: Encoder | None = None,
) -> SeparationResult:
    """Read a handoff's stems back and run :func:`~gpu_worker.stages.finish` on them (the CPU function)."""
    import tempfile

    started, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        doc = json.loads(handoff_json)
        job = SeparationJob.from_dict(doc["job"])
    except (ValueError, KeyError, TypeError) as err:
        raise JobError(f"The handoff document is not readable: {err}.") from None
    if doc.get("version") != HANDOFF_VERSION:
        raise JobError(f"The handoff has version {doc.get('version')}; this worker reads {HANDOFF_VERSION}.")
    out_store = store or open_store(job.out_storage)
    state = JobState(
        job=job,
        strategy=parse_strategy(job.strategy_name, job.strategy, where="job.strategy"),
        in_store=out_store,
        out_store=out_store,
        device=SimpleNamespace(type=doc["device_type"], label=doc["device"]),
        backend=doc["backend"],
        startup_s=float(doc["startup_s"]),
        progress=None,
        observer=None,
        tmp=tempfile.TemporaryDirectory(prefix="stemset-finish-"),
        started=started - float(doc["timings"].get("total", 0.0)),
        cpu_started=cpu0,
        timings=dict(doc["timings"]),
        sha=doc["sha256"],
        info=SimpleNamespace(duration_s=doc["duration_s"]),
        stats=SimpleNamespace(segments=doc["segments"], batches=doc["batches"]),
        gpu_peak_mb=doc["gpu_peak_mb"],
    )
    try:
        t0 = time.perf_counter()
        shape = (int(doc["channels"]), int(doc["frames"]))
        state.stems = {}
        for name, key in doc["keys"].items():
            path = Path(state.tmpdir) / f"{name}.f32"
            out_store.download(key, path)
            state.stems[name] = np.fromfile(path, dtype=np.float32).reshape(shape)
            path.unlink()
        state.timings["handoff_read"] = time.perf_counter() - t0
        ext = job.output_format
        state.files = {name: state.tmpdir / f"{name}.{ext}" for name in state.stems}
        state.wav = np.zeros((0,), np.float32)  # the residual was measured on the GPU side
        state.residual_db = doc["residual_db"]

        def release(_state: JobState) -> tuple[float, float]:
            mine = cpu_seconds() - cpu0
            state.timings["cpu_function"] = mine
            return float(doc["held_s"]), float(doc["cpu_s"]) + mine

        state.release = release
        result = finish(state, pool=pool, encode=encode, residual_known=True)
    finally:
        state.close()
    for key in doc["keys"].values():
        try:
            out_store.delete(key)
        except StorageError as err:
            log.warning("published %s but could not delete handoff object %s: %s", job.job_id, key, err)
    return result


def _device_label(device) -> str:
    from .inference import device_name  # lazy: torch

    return device_name(device)

"""One separation job in three stages, the one code path of every backend:

1. :func:`fetch` (CPU): download the input, hash it, decode it (or, for a long input, only scan
   its statistics: :mod:`gpu_worker.streaming` decodes it again window by window);
2. :func:`separate` (the device): load the models and separate. A streamed input is separated
   and encoded window by window here, in bounded memory;
3. :func:`finish` (CPU): measure every stem in one pass (:func:`~gpu_worker.audio.analyse.analyse_stem`)
   and encode it, the stems in parallel on a thread pool (FFmpeg and libsndfile release the GIL),
   upload them to staging keys and publish the set with the manifest last.

:func:`gpu_worker.worker.run_job` runs the three in a row; :class:`gpu_worker.pipeline.JobPipeline`
runs them on a backlog so the device separates song k+1 while song k is finished. A stage
records when it started and ended in ``JobState.marks`` (``time.perf_counter`` seconds) and tells
the optional observer, which is how the tests see the overlap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import ENGINE_VERSION, models
from .audio.analyse import analyse_stem, residual_db
from .audio.decode import decode_audio
from .audio.encode import StemWriter, encode_audio
from .audio.info import SAMPLE_RATE, AudioWarning
from .audio.source import open_source
from .cpu_allocator import release_freed_memory
from .errors import AudioError, JobError, StorageError
from .hashing import file_sha256 as _sha256
from .job import AAC_CODERS, MANIFEST_NAME, SeparationJob, SeparationResult, StemFile, StorageRef
from .manifests import superseded
from .process_memory import peak_rss_mb
from .stores.base import ObjectStore
from .stores.local import LocalObjectStore
from .stores.publish import STAGING_DIR, new_attempt, publish_set, set_key
from .stores.s3 import S3ObjectStore
from .strategy import Strategy, parse_strategy

Progress = Callable[[float], None]  # fraction of the job done, 0..1
Observer = Callable[[str, str, float], None]  # (job id, mark, perf_counter time)
Encoder = Callable[..., None]  # encode_audio(wav, path, fmt, bitrate_kbps)

EXTENSIONS = {"wav": "wav", "flac": "flac", "opus": "opus", "m4a": "m4a"}

# Inputs longer than this many seconds are separated in bounded memory (gpu_worker.streaming):
# decoded, separated and encoded window by window instead of whole. 0 streams every input.
STREAM_MIN_SECONDS_ENV = "STEMSET_STREAM_MIN_SECONDS"
DEFAULT_STREAM_MIN_SECONDS = 600.0
STREAM_WINDOW_ENV = "STEMSET_STREAM_WINDOW_S"  # optional: seconds per streaming window


def open_store(ref: StorageRef) -> ObjectStore:
    """The object store a reference names; S3 credentials come from this machine's AWS_* variables."""
    if ref.backend == "local":
        return LocalObjectStore(Path(ref.root))
    return S3ObjectStore.from_settings(
        ref.endpoint_url, ref.bucket, region=ref.region or "auto", public_url=ref.public_url or None
    )


def job_seed(input_sha256: str, fingerprint: str) -> int:
    """Shift offsets are drawn from a seed fixed by input and strategy, so reruns are identical."""
    return int(hashlib.sha256(f"{input_sha256}:{fingerprint}".encode()).hexdigest()[:8], 16)


def stem_key(job: SeparationJob, stem: str, attempt: str | None = None) -> str:
    """Where a stem is published: in the attempt's set folder, or flat under the prefix."""
    name = f"{stem}.{EXTENSIONS[job.output_format]}"
    if job.set_folder and attempt is not None:
        return set_key(job.output_prefix, attempt, name)
    return f"{job.output_prefix.rstrip('/')}/{name}"


def manifest_key(job: SeparationJob) -> str:
    return f"{job.output_prefix.rstrip('/')}/{MANIFEST_NAME}"


def cpu_seconds() -> float:
    """CPU seconds this process has used, every thread (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class JobState:
    """A job on its way through the stages: what fetch found, what separate made."""

    job: SeparationJob
    strategy: Strategy
    in_store: ObjectStore
    out_store: ObjectStore
    device: Any
    backend: str
    startup_s: float
    progress: Progress | None
    observer: Observer | None
    tmp: tempfile.TemporaryDirectory
    started: float
    cpu_started: float
    timings: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    sha: str = ""
    info: Any = None
    local_input: Path | None = None
    named: Any = None
    stream: bool = False
    window_s: float | None = None
    wav: np.ndarray | None = None
    mix_stats: Any = None
    length: int = 0
    stems: dict[str, np.ndarray] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    described: dict[str, dict] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    residual_db: float | None = None
    stats: Any = None
    gpu_peak_mb: float | None = None
    # Set by a pipeline's device clock (gpu_worker.pipeline.DeviceClock): when this job's hold on
    # the device began and ended, as (perf_counter, process CPU seconds), and its release function
    # returning the (held seconds, CPU seconds) billed to it.
    hold_from: tuple[float, float] | None = None
    next_begin: tuple[float, float] | None = None
    released_at: tuple[float, float] | None = None
    release: Callable[[JobState], tuple[float, float]] | None = None

    @property
    def tmpdir(self) -> Path:
        return Path(self.tmp.name)

    def mark(self, name: str) -> None:
        when = time.perf_counter()
        self.marks[name] = when
        if self.observer is not None:
            self.observer(self.job.job_id, name, when)

    def close(self) -> None:
        """Free the job's samples and temporary files (idempotent)."""
        self.wav = self.stems = None
        self.tmp.cleanup()


def fetch(
    job: SeparationJob,
    *,
    store: ObjectStore | None = None,
    output_store: ObjectStore | None = None,
    progress: Progress | None = None,
    backend: str = "local",
    startup_s: float = 0.0,
    observer: Observer | None = None,
) -> JobState:
    """Stage 1 (CPU): download, hash and decode ``job``'s input. ``store`` overrides ``job.storage``."""
    from .inference import pick_device  # lazy: torch

    started, cpu_started = time.perf_counter(), cpu_seconds()
    if job.output_format not in EXTENSIONS:
        raise JobError(f"Unknown output format {job.output_format!r}; use one of {sorted(EXTENSIONS)}.")
    if job.aac_coder is not None and job.aac_coder not in AAC_CODERS:
        raise JobError(f"Unknown AAC coder {job.aac_coder!r}; use one of {', '.join(AAC_CODERS)}.")
    strategy = parse_strategy(job.strategy_name, job.strategy, where="job.strategy")
    in_store = store or open_store(job.storage)
    out_store = output_store or store or open_store(job.out_storage)
    state = JobState(
        job=job,
        strategy=strategy,
        in_store=in_store,
        out_store=out_store,
        device=pick_device(job.device),
        backend=backend,
        startup_s=float(startup_s),
        progress=progress,
        observer=observer,
        tmp=tempfile.TemporaryDirectory(prefix="stemset-job-"),
        started=started,
        cpu_started=cpu_started,
    )
    state.mark("fetch_start")
    try:
        _fetch_into(state)
    except BaseException:
        state.close()
        raise
    state.timings["decode"] = time.perf_counter() - started
    state.mark("fetch_end")
    return state


def _fetch_into(state: JobState) -> None:
    job, in_store = state.job, state.in_store
    local_input = state.tmpdir / "input" / (Path(job.input_key).name or "input")
    local_input.parent.mkdir()
    in_store.download(job.input_key, local_input)
    state.sha = _sha256(local_input)
    state.named = named = _user_named_errors(local_input, in_store.uri(job.input_key))
    with named, warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioWarning)  # the decode below warns, once
        state.stream = _should_stream(open_source(local_input).info)  # the header only
    state.window_s = _stream_window_s() if state.stream else None
    if state.stream:  # long input: only statistics now; the samples are decoded again window by window
        from .stream_stats import scan_file  # lazy: torch

        with named:
            state.mix_stats, state.info = scan_file(local_input)
        state.length = state.mix_stats.frames
        state.local_input = local_input
    else:
        with named:
            state.wav, state.info = decode_audio(local_input)
        local_input.unlink()
        state.length = state.wav.shape[-1]
    if state.length == 0:
        raise AudioError(f"{job.input_key} holds no audio samples.", "Upload a recording that is not empty.")


def separate(state: JobState) -> JobState:
    """Stage 2 (the device): load the models and separate. A streamed input is also encoded here."""
    import torch

    from . import streaming
    from .engine import run_strategy, strategy_segments
    from .inference import EngineStats

    state.mark("separate_start")
    job, strategy, device = state.job, state.strategy, state.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()

    def load(name: str):
        return models.load_model(name, job.model_repo)

    for name in strategy.models:
        load(name)
    state.timings["model_load"] = time.perf_counter() - t0

    total_segments = max(1, strategy_segments(strategy, state.length, load))
    done = [0]

    def on_segments(n: int) -> None:
        done[0] += n
        if state.progress:
            state.progress(min(0.95, 0.9 * done[0] / total_segments))

    t0 = time.perf_counter()
    state.stats = stats = EngineStats()
    seed = job.seed if job.seed is not None else job_seed(state.sha, job.fingerprint)
    ext = EXTENSIONS[job.output_format]
    state.files = {name: state.tmpdir / f"{name}.{ext}" for name in strategy.stems}
    if state.stream:
        files = state.files
        with state.named:
            streamed = streaming.separate_file_streaming(
                strategy,
                state.local_input,
                lambda name: StemWriter(files[name], job.output_format, job.bitrate_kbps, aac_coder=job.aac_coder),
                load,
                device,
                seed=seed,
                window_s=state.window_s,
                progress=on_segments,
                stats=stats,
                mix_stats=state.mix_stats,
                tmpdir=state.tmpdir,
            )
        state.local_input.unlink()
        state.timings["separate"] = streamed.timings["separate"]
        state.timings["encode"] = streamed.timings["encode"]
        state.timings["analyse"] = 0.0  # measured on the fly, inside the encode loop
        state.residual_db = streamed.residual_db
        for name, stem_stats in streamed.stems.items():
            state.described[name] = _describe(stem_stats.lufs, stem_stats.peak, stem_stats.rms, stem_stats.nonfinite)
            state.durations[name] = stem_stats.frames / SAMPLE_RATE
    else:
        stems = run_strategy(
            strategy, torch.from_numpy(state.wav), load, device, seed=seed, progress=on_segments, stats=stats
        )
        state.stems = {name: t.detach().float().cpu().numpy() for name, t in stems.items()}
        state.timings["separate"] = time.perf_counter() - t0
    if device.type == "cuda":
        state.gpu_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    release_freed_memory()  # the forwards' kept heap, before encoding (gpu_worker.cpu_allocator)
    state.mark("separate_end")
    return state


def finish(
    state: JobState, *, pool: Executor | None = None, encode: Encoder | None = None, residual_known: bool = False
) -> SeparationResult:
    """Stage 3 (CPU): measure and encode every stem (in parallel on ``pool``, or on a pool of
    its own), stage the files, publish the set with the manifest last. Nothing is published
    unless every stem was encoded and staged."""
    state.mark("finish_start")
    job = state.job
    own_pool = None
    if pool is None:
        own_pool = pool = ThreadPoolExecutor(max_workers=max(1, min(len(state.files), os.cpu_count() or 1)))
    try:
        if state.stems is not None:
            encoder = encode or functools.partial(encode_audio, aac_coder=job.aac_coder)
            _analyse_and_encode(state, pool, encoder, residual_known)
        t0 = time.perf_counter()
        prefix = job.output_prefix.rstrip("/")
        attempt = new_attempt(job.job_id)  # publish_set sweeps what earlier attempts left
        final = {name: stem_key(job, name, attempt) for name in state.files}
        staged = {name: f"{prefix}/{STAGING_DIR}/{attempt}/{final[name].rsplit('/', 1)[-1]}" for name in state.files}
        try:
            for upload in [pool.submit(state.out_store.upload, state.files[n], staged[n]) for n in state.files]:
                upload.result()
        except StorageError as err:
            raise StorageError(
                f"Uploading the stems of {state.out_store.uri(prefix)} failed: {err.message} Nothing was published: "
                "readers still see the previous set, if there was one.",
                err.hint or "Run the job again once storage is reachable; the next run removes the partial upload.",
            ) from err
    finally:
        if own_pool is not None:
            own_pool.shutdown(wait=True)
    stem_files = {
        name: StemFile(
            name=name,
            key=final[name],
            uri=state.out_store.uri(final[name]),
            format=job.output_format,
            bytes=state.files[name].stat().st_size,
            duration_s=state.durations[name],
            **state.described[name],
        )
        for name in state.files
    }
    replaces = superseded(state.out_store, prefix, manifest_key(job), set(final.values()))
    timings = state.timings
    timings["write"] = time.perf_counter() - t0  # the manifest write below is not counted
    timings["total"] = time.perf_counter() - state.started
    if state.release is not None:
        held, cpu = state.release(state)
    else:  # run alone: the device is held for the whole job
        held, cpu = timings["total"], cpu_seconds() - state.cpu_started
    timings["held"], timings["cpu"] = held, cpu
    if state.startup_s > 0:
        timings["startup"] = state.startup_s
    result = SeparationResult(
        job_id=job.job_id,
        strategy_name=state.strategy.name,
        fingerprint=job.fingerprint,
        input_key=job.input_key,
        input_sha256=state.sha,
        input_duration_s=state.info.duration_s,
        sample_rate=SAMPLE_RATE,
        stems=stem_files,
        manifest_key=manifest_key(job),
        residual_db=state.residual_db,
        timings={k: round(v, 4) for k, v in timings.items()},
        device=_device_name(state.device),
        gpu_type=job.gpu_type if state.device.type == "cuda" else None,
        peak_memory_mb=round(peak_rss_mb(), 1),
        gpu_peak_memory_mb=state.gpu_peak_mb,
        billed_seconds=round(held + max(0.0, state.startup_s), 3),
        segments=state.stats.segments,
        batches=state.stats.batches,
        engine_version=ENGINE_VERSION,
        backend=state.backend,
        replaces=replaces,
    )
    publish_set(state.out_store, staged, final, manifest_key(job), result.to_json().encode())
    state.mark("finish_end")
    if state.progress:
        state.progress(1.0)
    return result


def _analyse_and_encode(state: JobState, pool: Executor, encode: Encoder, residual_known: bool = False) -> None:
    """Every stem measured in one pass and encoded, stems in parallel; the first error raised
    once all have stopped (so no encoder still writes into the job's folder)."""
    job, stems = state.job, state.stems
    assert stems is not None
    state.mark("encode_start")
    t0 = time.perf_counter()
    mix, state.wav = state.wav, None  # the mix is needed only by the residual task below
    # The residual is a task beside the stems' on the pool, not a serial step before them.
    residual = None if residual_known else pool.submit(residual_db, mix, list(stems.values()))
    del mix

    def one(name: str) -> float:
        stem = stems[name]
        a0 = time.perf_counter()
        analysis = analyse_stem(stem)
        analyse_s = time.perf_counter() - a0
        if analysis.nonfinite:
            stem = np.nan_to_num(stem, nan=0.0, posinf=0.0, neginf=0.0)
        encode(stem, state.files[name], job.output_format, job.bitrate_kbps)
        state.described[name] = _describe(analysis.lufs, analysis.sample_peak, analysis.rms, analysis.nonfinite)
        state.durations[name] = stem.shape[-1] / SAMPLE_RATE
        return analyse_s

    futures = {name: pool.submit(one, name) for name in stems}
    errors = []
    analyse_s = 0.0
    for future in futures.values():
        try:
            analyse_s += future.result()
        except Exception as err:  # noqa: BLE001 - re-raised below, after every stem has stopped
            errors.append(err)
    if residual is not None:
        try:
            state.residual_db = residual.result()
        except Exception as err:  # noqa: BLE001 - as above
            errors.append(err)
    state.stems = None
    if errors:
        raise errors[0]
    state.timings["analyse"] = analyse_s  # summed over stems (they run in parallel)
    state.timings["encode"] = time.perf_counter() - t0  # wall time of measuring + encoding
    state.mark("encode_end")


def _describe(lufs: float | None, peak: float, rms: float, nonfinite: int) -> dict:
    """A stem's figures for its manifest entry, the same whether measured whole or streamed."""
    return {
        "lufs": _round(lufs),
        "peak_dbfs": _round(20 * np.log10(peak)) if peak > 0 else None,
        "sample_peak": round(float(peak), 6),
        "rms_dbfs": _round(20 * np.log10(rms)) if rms > 0 else None,
        "nonfinite_samples": nonfinite,
    }


def _device_name(device) -> str:
    if getattr(device, "label", None):  # a device named by the side that used it (gpu_worker.handoff)
        return device.label
    from .inference import device_name  # lazy: torch

    return device_name(device)


def _should_stream(info) -> bool:
    """Stream inputs longer than STEMSET_STREAM_MIN_SECONDS (default 600), judged from the header;
    an input whose header states no length (raw ADTS, some WebM) is streamed to be safe."""
    raw = os.environ.get(STREAM_MIN_SECONDS_ENV, "").strip()
    try:
        threshold = float(raw) if raw else DEFAULT_STREAM_MIN_SECONDS
    except ValueError:
        raise JobError(f"{STREAM_MIN_SECONDS_ENV}={raw!r} is not a number of seconds.") from None
    if info.frames <= 0:
        return True
    return threshold <= 0 or info.duration_s > threshold


def _stream_window_s() -> float | None:
    raw = os.environ.get(STREAM_WINDOW_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise JobError(f"{STREAM_WINDOW_ENV}={raw!r} must be a positive number of seconds.")
    return value


class _user_named_errors(contextlib.AbstractContextManager):
    """Audio errors and warnings name the user's object, not our temporary copy of it (reusable)."""

    def __init__(self, local_input: Path, where: str):
        self.local, self.where = str(local_input), where
        self._caught: list[warnings.catch_warnings] = []

    def __enter__(self):
        catcher = warnings.catch_warnings(record=True)
        self._caught.append(catcher)
        self._records = catcher.__enter__()
        warnings.simplefilter("always", AudioWarning)
        return self

    def __exit__(self, exc_type, err, tb):
        records = self._records
        self._caught.pop().__exit__(None, None, None)
        for w in records:
            if issubclass(w.category, AudioWarning):
                warnings.warn(str(w.message).replace(self.local, self.where), AudioWarning, stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if isinstance(err, AudioError):
            raise AudioError(
                err.message.replace(self.local, self.where),
                err.hint.replace(self.local, self.where) if err.hint else None,
            ) from None
        return False


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)

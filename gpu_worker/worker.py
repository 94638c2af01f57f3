"""Run one separation job: fetch the input, separate, encode, stage, publish stems + manifest.

The same function serves every backend: in-process (the local separator, `stemset separate`),
behind HTTP (`stemset worker serve`) and inside the Modal class. Stems are written under
staging keys and published as a complete set, the manifest last, so a reader that finds a
manifest finds every stem it lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import ENGINE_VERSION, models
from .audio.analyse import integrated_loudness, peak_dbfs, sample_peak
from .audio.decode import decode_audio
from .audio.encode import StemWriter, encode_audio
from .audio.info import SAMPLE_RATE, AudioWarning
from .audio.source import open_source
from .errors import AudioError, JobError, StorageError
from .hashing import file_sha256 as _sha256
from .job import MANIFEST_NAME, SeparationJob, SeparationResult, StemFile, StorageRef
from .stores.base import ObjectStore
from .stores.local import LocalObjectStore
from .stores.publish import STAGING_DIR, new_attempt, publish_set, set_key
from .stores.s3 import S3ObjectStore
from .strategy import parse_strategy

Progress = Callable[[float], None]  # fraction of the job done, 0..1

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


def read_manifest(store: ObjectStore, key: str) -> SeparationResult | None:
    """The published result at ``key``, or None when there is none (or it is unreadable)."""
    if store.head(key) is None:
        return None
    try:
        return SeparationResult.from_json(store.get_bytes(key))
    except JobError:
        return None


def run_job(
    job: SeparationJob,
    *,
    store: ObjectStore | None = None,
    output_store: ObjectStore | None = None,
    progress: Progress | None = None,
    backend: str = "local",
    startup_s: float = 0.0,
) -> SeparationResult:
    """Separate ``job.input_key`` and publish the stems. ``store`` overrides ``job.storage``.

    ``startup_s`` is time the calling worker spent getting ready for this job before the call
    (a warm worker's model preload, charged to the first job of a container): it is reported as
    ``timings["startup"]`` and added to ``billed_seconds``.
    """
    # torch, Demucs and the engine load here, not at import: read_manifest and open_store need none of them.
    import torch

    from . import streaming
    from .engine import run_strategy, strategy_segments
    from .inference import EngineStats, device_name, pick_device
    from .stream_stats import scan_file

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if job.output_format not in EXTENSIONS:
        raise JobError(f"Unknown output format {job.output_format!r}; use one of {sorted(EXTENSIONS)}.")
    strategy = parse_strategy(job.strategy_name, job.strategy, where="job.strategy")
    in_store = store or open_store(job.storage)
    out_store = output_store or store or open_store(job.out_storage)
    device = pick_device(job.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory(prefix="stemset-job-") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        local_input = tmpdir / "input" / (Path(job.input_key).name or "input")
        local_input.parent.mkdir()
        in_store.download(job.input_key, local_input)
        sha = _sha256(local_input)
        named = _user_named_errors(local_input, in_store.uri(job.input_key))
        with named, warnings.catch_warnings():
            warnings.simplefilter("ignore", AudioWarning)  # the decode below warns, once
            stream = _should_stream(open_source(local_input).info)  # the header only
        window_s = _stream_window_s() if stream else None
        wav = mix_stats = None
        if stream:  # long input: only statistics now; the samples are decoded again window by window
            with named:
                mix_stats, info = scan_file(local_input)
            length = mix_stats.frames
        else:
            with named:
                wav, info = decode_audio(local_input)
            local_input.unlink()
            length = wav.shape[-1]
        if length == 0:
            raise AudioError(f"{job.input_key} holds no audio samples.", "Upload a recording that is not empty.")
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()

        def load(name: str):
            return models.load_model(name, job.model_repo)

        for name in strategy.models:
            load(name)
        timings["model_load"] = time.perf_counter() - t0

        total_segments = max(1, strategy_segments(strategy, length, load))
        done = [0]

        def on_segments(n: int) -> None:
            done[0] += n
            if progress:
                progress(min(0.95, 0.9 * done[0] / total_segments))

        t0 = time.perf_counter()
        stats = EngineStats()
        seed = job.seed if job.seed is not None else job_seed(sha, job.fingerprint)
        files: dict[str, Path] = {name: tmpdir / f"{name}.{EXTENSIONS[job.output_format]}" for name in strategy.stems}
        described: dict[str, dict] = {}
        durations: dict[str, float] = {}
        if stream:
            # Decode, separate and encode window by window (timings split inside).
            with named:
                streamed = streaming.separate_file_streaming(
                    strategy,
                    local_input,
                    lambda name: StemWriter(files[name], job.output_format, job.bitrate_kbps),
                    load,
                    device,
                    seed=seed,
                    window_s=window_s,
                    progress=on_segments,
                    stats=stats,
                    mix_stats=mix_stats,
                    tmpdir=tmpdir,
                )
            local_input.unlink()
            timings["separate"] = streamed.timings["separate"]
            timings["encode"] = streamed.timings["encode"]
            residual_db = streamed.residual_db
            for name, stem_stats in streamed.stems.items():
                described[name] = _describe_stream(stem_stats)
                durations[name] = stem_stats.frames / SAMPLE_RATE
        else:
            stems = run_strategy(
                strategy, torch.from_numpy(wav), load, device, seed=seed, progress=on_segments, stats=stats
            )
            stems = {name: t.detach().float().cpu().numpy() for name, t in stems.items()}
            timings["separate"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            residual_db = _residual_db(wav, list(stems.values()))
            for name, stem in stems.items():
                nonfinite = int(stem.size - np.count_nonzero(np.isfinite(stem)))
                if nonfinite:
                    stem = np.nan_to_num(stem, nan=0.0, posinf=0.0, neginf=0.0)
                encode_audio(stem, files[name], job.output_format, job.bitrate_kbps)
                described[name] = _describe(stem, nonfinite)
                durations[name] = stem.shape[-1] / SAMPLE_RATE
            timings["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prefix = job.output_prefix.rstrip("/")
        attempt = new_attempt(job.job_id)  # publish_set sweeps what earlier attempts left
        staged, final = {}, {}
        for name, path in files.items():
            final[name] = stem_key(job, name, attempt)
            staged[name] = f"{prefix}/{STAGING_DIR}/{attempt}/{final[name].rsplit('/', 1)[-1]}"
            try:
                out_store.upload(path, staged[name])
            except StorageError as err:
                raise StorageError(
                    f"Uploading the stems of {out_store.uri(prefix)} failed: {err.message} Nothing was published: "
                    "readers still see the previous set, if there was one.",
                    err.hint or "Run the job again once storage is reachable; the next run removes the partial upload.",
                ) from err
        stem_files = {
            name: StemFile(
                name=name,
                key=final[name],
                uri=out_store.uri(final[name]),
                format=job.output_format,
                bytes=files[name].stat().st_size,
                duration_s=durations[name],
                **described[name],
            )
            for name in files
        }
        gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        replaces = _superseded(out_store, prefix, manifest_key(job), set(final.values()))
        timings["write"] = time.perf_counter() - t0  # the manifest write below is not counted
        timings["total"] = time.perf_counter() - started
        if startup_s > 0:
            timings["startup"] = float(startup_s)
        result = SeparationResult(
            job_id=job.job_id,
            strategy_name=strategy.name,
            fingerprint=job.fingerprint,
            input_key=job.input_key,
            input_sha256=sha,
            input_duration_s=info.duration_s,
            sample_rate=SAMPLE_RATE,
            stems=stem_files,
            manifest_key=manifest_key(job),
            residual_db=residual_db,
            timings={k: round(v, 4) for k, v in timings.items()},
            device=device_name(device),
            gpu_type=job.gpu_type if device.type == "cuda" else None,
            peak_memory_mb=round(_peak_rss_mb(), 1),
            gpu_peak_memory_mb=gpu_peak,
            billed_seconds=round(timings["total"] + max(0.0, float(startup_s)), 3),
            segments=stats.segments,
            batches=stats.batches,
            engine_version=ENGINE_VERSION,
            backend=backend,
            replaces=replaces,
        )
        publish_set(out_store, staged, final, manifest_key(job), result.to_json().encode())
    if progress:
        progress(1.0)
    return result


def _superseded(store: ObjectStore, prefix: str, mkey: str, new_keys: set[str]) -> list[str]:
    """What the new manifest replaces: the stems the current one lists, and what it said it
    replaced that a kill left in place (so a sweep can delete them however the kill fell)."""
    before = read_manifest(store, mkey)
    if before is None:
        return []
    old = {f.key for f in before.stems.values()} | set(before.replaces)
    present = {info.key for info in store.list(prefix + "/")} if before.replaces else old
    return sorted((old & present) - new_keys)


def _describe(stem: np.ndarray, nonfinite: int) -> dict:
    rms = float(np.sqrt(np.mean(np.square(stem, dtype=np.float64)))) if stem.size else 0.0
    return {
        "lufs": _round(integrated_loudness(stem)),
        "peak_dbfs": _round(peak_dbfs(stem)),
        "sample_peak": round(float(sample_peak(stem)), 6),
        "rms_dbfs": _round(20 * np.log10(rms)) if rms > 0 else None,
        "nonfinite_samples": nonfinite,
    }


def _describe_stream(stats) -> dict:
    """``_describe`` from a ``StreamStats`` (same fields, same rounding)."""
    rms = stats.rms
    return {
        "lufs": _round(stats.lufs),
        "peak_dbfs": _round(20.0 * math.log10(stats.peak)) if stats.peak > 0 else None,
        "sample_peak": round(float(stats.peak), 6),
        "rms_dbfs": _round(20 * np.log10(rms)) if rms > 0 else None,
        "nonfinite_samples": stats.nonfinite,
    }


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


def _residual_db(mix: np.ndarray, stems: list[np.ndarray]) -> float | None:
    """Level of mix minus the sum of the stems, relative to the mix, in dB (lower is better)."""
    total = np.zeros_like(mix, dtype=np.float64)
    for stem in stems:
        total += np.nan_to_num(stem.astype(np.float64))
    mix_energy = float(np.sum(np.square(mix, dtype=np.float64)))
    if mix_energy == 0:
        return None
    residual = float(np.sum(np.square(mix - total)))
    return round(10 * np.log10(max(residual, 1e-30) / mix_energy), 2)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Run one separation job: fetch the input, separate, encode, stage, publish stems + manifest.

The same function serves every backend: in-process (the local separator, `stemset separate`),
behind HTTP (`stemset worker serve`) and inside the Modal class. Stems are written under
staging keys and published as a complete set, the manifest last, so a reader that finds a
manifest finds every stem it lists.
"""

from __future__ import annotations

import hashlib
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import ENGINE_VERSION
from .errors import AudioError, JobError
from .job import MANIFEST_NAME, SeparationJob, SeparationResult, StemFile, StorageRef
from .objects import LocalObjectStore, ObjectStore, S3ObjectStore, publish_set, staging_key
from .strategy import parse_strategy

Progress = Callable[[float], None]  # fraction of the job done, 0..1

EXTENSIONS = {"wav": "wav", "flac": "flac", "opus": "opus", "m4a": "m4a"}


def open_store(ref: StorageRef) -> ObjectStore:
    """The object store a reference names; S3 credentials come from this machine's AWS_* variables."""
    if ref.backend == "local":
        return LocalObjectStore(Path(ref.root))
    return S3ObjectStore.from_settings(ref.endpoint_url, ref.bucket, region=ref.region or "auto",
                                       public_url=ref.public_url or None)


def job_seed(input_sha256: str, fingerprint: str) -> int:
    """Shift offsets are drawn from a seed fixed by input and strategy, so reruns are identical."""
    return int(hashlib.sha256(f"{input_sha256}:{fingerprint}".encode()).hexdigest()[:8], 16)


def stem_key(job: SeparationJob, stem: str) -> str:
    return f"{job.output_prefix.rstrip('/')}/{stem}.{EXTENSIONS[job.output_format]}"


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
) -> SeparationResult:
    """Separate ``job.input_key`` and publish the stems. ``store`` overrides ``job.storage``."""
    import torch

    from . import audio, models
    from .engine import EngineStats, device_name, pick_device, run_strategy, strategy_segments

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
        try:
            wav, info = audio.decode_audio(local_input)
        except AudioError as err:  # name the user's object, not our temporary copy
            where = in_store.uri(job.input_key)
            raise AudioError(err.message.replace(str(local_input), where),
                             err.hint.replace(str(local_input), where) if err.hint else None) from None
        local_input.unlink()
        if wav.shape[-1] == 0:
            raise AudioError(f"{job.input_key} holds no audio samples.", "Upload a recording that is not empty.")
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()

        def load(name: str):
            return models.load_model(name, job.model_repo)

        for name in strategy.models:
            load(name)
        timings["model_load"] = time.perf_counter() - t0

        mix = torch.from_numpy(wav)
        total_segments = max(1, strategy_segments(strategy, mix.shape[-1], load))
        done = [0]

        def on_segments(n: int) -> None:
            done[0] += n
            if progress:
                progress(min(0.95, 0.9 * done[0] / total_segments))

        t0 = time.perf_counter()
        stats = EngineStats()
        seed = job.seed if job.seed is not None else job_seed(sha, job.fingerprint)
        stems = run_strategy(strategy, mix, load, device, seed=seed, progress=on_segments, stats=stats)
        stems = {name: t.detach().float().cpu().numpy() for name, t in stems.items()}
        timings["separate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        residual_db = _residual_db(wav, list(stems.values()))
        files: dict[str, Path] = {}
        described: dict[str, dict] = {}
        for name, stem in stems.items():
            nonfinite = int(stem.size - np.count_nonzero(np.isfinite(stem)))
            if nonfinite:
                stem = np.nan_to_num(stem, nan=0.0, posinf=0.0, neginf=0.0)
            path = tmpdir / f"{name}.{EXTENSIONS[job.output_format]}"
            audio.encode_audio(stem, path, job.output_format, job.bitrate_kbps)
            files[name] = path
            described[name] = _describe(stem, nonfinite)
        timings["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        staged, final = {}, {}
        for name, path in files.items():
            staged[name] = staging_key(stem_key(job, name), job.job_id)
            final[name] = stem_key(job, name)
            out_store.upload(path, staged[name])
        stem_files = {
            name: StemFile(name=name, key=final[name], uri=out_store.uri(final[name]), format=job.output_format,
                           bytes=files[name].stat().st_size, duration_s=stems[name].shape[-1] / audio.SAMPLE_RATE,
                           **described[name])
            for name in stems
        }
        gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        timings["write"] = time.perf_counter() - t0  # the manifest write below is not counted
        timings["total"] = time.perf_counter() - started
        result = SeparationResult(
            job_id=job.job_id, strategy_name=strategy.name, fingerprint=job.fingerprint,
            input_key=job.input_key, input_sha256=sha, input_duration_s=info.duration_s,
            sample_rate=audio.SAMPLE_RATE, stems=stem_files, manifest_key=manifest_key(job),
            residual_db=residual_db, timings={k: round(v, 4) for k, v in timings.items()},
            device=device_name(device), gpu_type=job.gpu_type if device.type == "cuda" else None,
            peak_memory_mb=round(_peak_rss_mb(), 1), gpu_peak_memory_mb=gpu_peak,
            billed_seconds=round(timings["total"], 3), segments=stats.segments, batches=stats.batches,
            engine_version=ENGINE_VERSION, backend=backend,
        )
        publish_set(out_store, staged, final, manifest_key(job), result.to_json().encode())
    if progress:
        progress(1.0)
    return result


def _describe(stem: np.ndarray, nonfinite: int) -> dict:
    from . import audio

    rms = float(np.sqrt(np.mean(np.square(stem, dtype=np.float64)))) if stem.size else 0.0
    return {
        "lufs": _round(audio.integrated_loudness(stem)),
        "peak_dbfs": _round(audio.peak_dbfs(stem)),
        "sample_peak": round(float(audio.sample_peak(stem)), 6),
        "rms_dbfs": _round(20 * np.log10(rms)) if rms > 0 else None,
        "nonfinite_samples": nonfinite,
    }


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


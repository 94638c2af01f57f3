"""The wire contract between Stemset and any separator backend (local, HTTP, Modal).

Plain dataclasses with a version field and a JSON round trip. A job names where the input is
and where the stems go (storage references carry no secrets: the worker has its own
credentials), and the strategy tree to run. The worker answers with a result that records
every stem it wrote, the manifest, timings, device and billed seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import JobError

# FFmpeg's AAC quantiser searches for m4a (FFmpeg 8 dropped "anmr"). ``fast`` is Stemset's default:
# ~0.37x twoloop's CPU on stem-like audio and no worse by the proxies of benchmarks/aac_options.py.
AAC_CODERS = ("twoloop", "fast")
DEFAULT_AAC_CODER = "fast"

JOB_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class StorageRef:
    """Where objects live. Secrets are never part of it: the worker reads them from its environment."""

    backend: str  # "local" | "s3"
    root: str | None = None  # local: the folder keys are relative to
    bucket: str | None = None  # s3
    endpoint_url: str | None = None
    region: str | None = "auto"
    public_url: str | None = None

    def __post_init__(self):
        if self.backend not in ("local", "s3"):
            raise JobError(f"Unknown storage backend {self.backend!r} in job (expected local or s3).")
        if self.backend == "local" and not self.root:
            raise JobError("A local storage reference needs a root folder.")
        if self.backend == "s3" and not self.bucket:
            raise JobError("An s3 storage reference needs a bucket.")


@dataclass(frozen=True)
class SeparationJob:
    job_id: str
    input_key: str
    output_prefix: str  # stems go under <output_prefix>/ (see set_folder), then <output_prefix>/manifest.json
    strategy_name: str
    strategy: dict[str, Any]  # the strategy tree, as Strategy.to_tree() writes it
    fingerprint: str
    storage: StorageRef
    output_storage: StorageRef | None = None  # defaults to `storage`
    output_format: str = "m4a"
    bitrate_kbps: int | None = 192
    aac_coder: str | None = None  # m4a: "fast" or "twoloop" (None: the encoder's default, fast)
    model_repo: str | None = None  # a folder on the worker's machine; None = Demucs' download
    device: str = "auto"
    seed: int | None = None  # shift offsets; None = derived from input and fingerprint
    gpu_type: str | None = None  # what the caller asked for; the worker reports what it ran on
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. partition key, for the manifest
    # True: stems go to a fresh set folder <output_prefix>/v-<attempt>/ and the manifest switches
    # to it atomically (stores.publish); False: <output_prefix>/<stem>.<ext> (a plain folder).
    set_folder: bool = True
    # Where the stems are measured, encoded and published: "worker" (beside the device, overlapped
    # by the job pipeline: Option B) or "cpu_function" (handed on to a CPU-only function: Option A,
    # Modal only; elsewhere it is the same as "worker").
    finish_on: str = "worker"
    version: int = JOB_VERSION

    @property
    def out_storage(self) -> StorageRef:
        return self.output_storage or self.storage

    def to_json(self) -> str:
        data = asdict(self)
        if data["aac_coder"] is None:  # unset: a worker deployed before the field still reads the job
            del data["aac_coder"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeparationJob:
        _check_version(data, "job")
        data = dict(data)
        if not isinstance(data.get("storage"), dict):
            raise JobError("The job has no storage reference (an object in field 'storage').")
        data["storage"] = _construct(StorageRef, data["storage"], "storage reference")
        if data.get("output_storage"):
            if not isinstance(data["output_storage"], dict):
                raise JobError("The job's 'output_storage' must be an object.")
            data["output_storage"] = _construct(StorageRef, data["output_storage"], "output storage reference")
        return _construct(cls, data, "job")

    @classmethod
    def from_json(cls, text: str | bytes) -> SeparationJob:
        return cls.from_dict(_loads(text, "job"))


@dataclass(frozen=True)
class StemFile:
    name: str
    key: str
    uri: str
    format: str
    bytes: int
    duration_s: float
    lufs: float | None
    peak_dbfs: float | None
    sample_peak: float
    rms_dbfs: float | None
    nonfinite_samples: int  # NaN/Inf the model produced (written as zeros); a check fails on any


@dataclass(frozen=True)
class SeparationResult:
    job_id: str
    strategy_name: str
    fingerprint: str
    input_key: str
    input_sha256: str
    input_duration_s: float
    sample_rate: int
    stems: dict[str, StemFile]
    manifest_key: str
    residual_db: float | None  # level of (mix - sum of stems) relative to the mix
    timings: dict[str, float]  # decode, model_load, separate, encode, write, total
    device: str
    gpu_type: str | None
    peak_memory_mb: float
    gpu_peak_memory_mb: float | None
    billed_seconds: float  # the worker's own clock, model load included
    segments: int
    batches: int
    engine_version: str
    backend: str = "local"
    reused: bool = False
    # Keys of the set this one replaced (what the manifest listed before): superseded for good, so
    # a sweep may delete any of them a kill left behind at once (gpu_worker.stores.publish.sweep).
    replaces: list[str] = field(default_factory=list)
    version: int = JOB_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> SeparationResult:
        """``strict=False`` drops fields this version does not know: a published manifest outlives
        the code that wrote it, and a later version may add fields (as ``replaces`` was added)."""
        _check_version(data, "result")
        data = dict(data)
        if not isinstance(data.get("stems"), dict):
            raise JobError("The result has no stems (an object in field 'stems').")
        data["stems"] = {k: _construct(StemFile, v, "stem", strict) for k, v in data["stems"].items()}
        return _construct(cls, data, "result", strict)

    @classmethod
    def from_json(cls, text: str | bytes, *, strict: bool = True) -> SeparationResult:
        return cls.from_dict(_loads(text, "result"), strict=strict)


def _loads(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise JobError(f"The {what} is not valid JSON: {err}.") from err
    if not isinstance(data, dict):
        raise JobError(f"The {what} must be a JSON object.")
    return data


def _check_version(data: dict[str, Any], what: str) -> None:
    version = data.get("version", JOB_VERSION)
    if version != JOB_VERSION:
        raise JobError(
            f"The {what} has contract version {version}; this worker speaks version {JOB_VERSION}.",
            "Deploy the same Stemset version on the worker and the Dagster side.",
        )


def _construct(cls, data: dict[str, Any], what: str, strict: bool = True):
    if not isinstance(data, dict):
        raise JobError(f"The {what} must be a JSON object.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown and strict:
        raise JobError(f"The {what} has unknown field(s) {unknown}.")
    data = {k: v for k, v in data.items() if k in known}
    try:
        return cls(**data)
    except TypeError as err:
        raise JobError(f"The {what} is incomplete: {err}.") from err

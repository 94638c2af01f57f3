"""What a stem set is worth keeping: fingerprints, data versions, current / stale / missing (and
why), gain suggestions.

Shared by the stem assets (reuse or recompute), their checks, the catalog and the status over
Dagster's records (:mod:`stemset_assets.defs.staleness`). A stem set is the manifest
``outputs/<profile>/<slug>/<strategy>/manifest.json`` plus the stems it lists.

- **current**: a manifest exists, made with the strategy's current fingerprint from the
  recording's current canonical FLAC (manifest ``input_sha256`` == the recording's
  ``source_sha256``);
- **stale**: a manifest exists but with another fingerprint or another input;
- **missing**: no manifest.

This module imports neither Dagster nor torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gpu_worker.job import SeparationResult
from gpu_worker.models import model_identity
from gpu_worker.strategy import Strategy, fingerprint

from ..config import StemsetConfig
from .layout import RecordingRecord

CURRENT, STALE, MISSING = "current", "stale", "missing"

# Reasons a (recording, strategy) pair is in its state, as the status over Dagster's records gives them.
STRATEGY_CHANGED = "strategy_changed"
RECORDING_CHANGED = "recording_changed"
INPUT_CHANGED = "input_changed"
INPUT_MISSING = "input_missing"
NOT_SEPARATED = "not_separated"
NOT_RECORDED = "recording_not_materialised"
UP_TO_DATE = "up_to_date"
STALE_REASONS = frozenset({STRATEGY_CHANGED, RECORDING_CHANGED, INPUT_CHANGED})

TARGET_LUFS = -14.0  # streaming loudness; the gain suggestion brings a stem here...
PEAK_CEILING_DBFS = -1.0  # ...unless its peak would go above this


def strategy_fingerprint(strategy: Strategy, model_repo: str | None) -> str:
    """The strategy's fingerprint, covering the identity of each model's weights in ``model_repo``
    (or Demucs' own bag files when None). Torch-free: reads only small yaml/file names."""
    return fingerprint(strategy, {m: model_identity(m, model_repo) for m in strategy.models})


def model_repo(config: StemsetConfig) -> str | None:
    """The configured Demucs model folder as text, or None for Demucs' own download."""
    return str(config.models.repo) if config.models.repo else None


def fingerprints(config: StemsetConfig) -> dict[str, str]:
    """``{strategy name: fingerprint}`` for every strategy in the config."""
    repo = model_repo(config)
    return {name: strategy_fingerprint(strategy, repo) for name, strategy in config.strategies.items()}


def data_version(input_sha256: str, fp: str) -> str:
    """A stem's data version: changes when the recording's input or the strategy changes."""
    return hashlib.sha256(f"{input_sha256}:{fp}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class SetState:
    state: str  # current | stale | missing
    reason: str  # why, in a few words


def set_state(manifest: SeparationResult | None, record: RecordingRecord | None, fp: str) -> SetState:
    """Compare a stored manifest with the recording and the strategy's fingerprint."""
    if manifest is None:
        return SetState(MISSING, "no stem set")
    reasons = []
    if manifest.fingerprint != fp:
        reasons.append(f"strategy changed ({manifest.fingerprint} -> {fp})")
    if record is None:
        reasons.append("recording not materialised")
    elif manifest.input_sha256 != record.source_sha256:
        reasons.append("recording changed")
    if reasons:
        return SetState(STALE, "; ".join(reasons))
    return SetState(CURRENT, "up to date")


@dataclass(frozen=True)
class PartitionState:
    """One partition x strategy, as the status over Dagster's records sees it."""

    partition: str
    profile: str
    strategy: str
    state: str  # current | stale | missing
    reason: str  # ";"-joined reason tokens (STRATEGY_CHANGED, ...)
    duration_s: float | None  # audio seconds (None when the recording was never materialised)
    input_present: bool | None  # None when the inputs were not listed
    original_key: str | None = None
    fingerprint: str | None = None  # of the latest stem set
    current_fingerprint: str = ""
    input_sha256: str | None = None  # the recording data version the stem set was made from
    recording_sha256: str | None = None  # the recording's latest data version
    backend: str | None = None
    billed_seconds: float | None = None
    cost_usd: float | None = None
    materialized_at: float | None = None

    @property
    def reasons(self) -> list[str]:
        return self.reason.split(";") if self.reason else []


@dataclass
class StrategyHistory:
    """What the latest materialisations of one strategy's stem sets recorded, for cost estimates."""

    runs: int = 0
    audio_seconds: float = 0.0
    billed_seconds: float = 0.0
    by_backend: dict[str, tuple[float, float]] = field(default_factory=dict)  # backend -> (audio s, billed s)

    def billed_per_audio_second(self, backend: str) -> float | None:
        audio, billed = self.by_backend.get(backend, (0.0, 0.0))
        return billed / audio if audio > 0 and billed > 0 else None


def suggested_gain_db(lufs: float | None, peak_dbfs: float | None, target_lufs: float = TARGET_LUFS,
                      ceiling_dbfs: float = PEAK_CEILING_DBFS) -> float:
    """dB to bring a stem to ``target_lufs``, capped so its peak stays at or under ``ceiling_dbfs``.

    0 for a silent stem (no loudness to measure). May be negative (a loud stem is turned down).
    """
    if lufs is None:
        return 0.0
    gain = target_lufs - lufs
    if peak_dbfs is not None:
        gain = min(gain, ceiling_dbfs - peak_dbfs)
    return round(gain, 1)

"""What a stem set is worth keeping: fingerprints, current / stale / missing, gain suggestions.

Shared by the stem assets (reuse or recompute), their checks and the catalog. A stem set is
the manifest ``outputs/<profile>/<slug>/<strategy>/manifest.json`` plus the stems it lists.

- **current**: a manifest exists, made with the strategy's current fingerprint from the
  recording's current canonical FLAC (manifest ``input_sha256`` == the recording's
  ``source_sha256``);
- **stale**: a manifest exists but with another fingerprint or another input;
- **missing**: no manifest.

This module imports neither Dagster nor torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gpu_worker.job import SeparationResult
from gpu_worker.models import model_identity
from gpu_worker.strategy import Strategy, fingerprint

from .layout import RecordingRecord

CURRENT, STALE, MISSING = "current", "stale", "missing"

TARGET_LUFS = -14.0  # streaming loudness; the gain suggestion brings a stem here...
PEAK_CEILING_DBFS = -1.0  # ...unless its peak would go above this


def strategy_fingerprint(strategy: Strategy, model_repo: str | None) -> str:
    """The strategy's fingerprint, covering the identity of each model's weights in ``model_repo``
    (or Demucs' own bag files when None). Torch-free: reads only small yaml/file names."""
    return fingerprint(strategy, {m: model_identity(m, model_repo) for m in strategy.models})


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

"""What identifies a stem set: strategy fingerprints and data versions; and gain suggestions.

(Whether a stored set is current is :mod:`stemset_assets.core.state`'s to say.) This module
imports neither Dagster nor torch.
"""

from __future__ import annotations

import hashlib

from gpu_worker.models import model_identity
from gpu_worker.strategy import Strategy, fingerprint

from ..config import StemsetConfig

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


def suggested_gain_db(
    lufs: float | None,
    peak_dbfs: float | None,
    target_lufs: float = TARGET_LUFS,
    ceiling_dbfs: float = PEAK_CEILING_DBFS,
) -> float:
    """dB to bring a stem to ``target_lufs``, capped so its peak stays at or under ``ceiling_dbfs``.

    0 for a silent stem (no loudness to measure). May be negative (a loud stem is turned down).
    """
    if lufs is None:
        return 0.0
    gain = target_lufs - lufs
    if peak_dbfs is not None:
        gain = min(gain, ceiling_dbfs - peak_dbfs)
    return round(gain, 1)

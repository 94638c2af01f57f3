"""Asset checks on every stem set, evaluated from the stored manifest.

Declared on each ``stems_<strategy>`` multi-asset (``check_specs``), partitioned like it, and
computed from ``outputs/<profile>/<slug>/<strategy>/manifest.json`` as read back from the store
after the run, so a reused set is checked exactly like a fresh one. In the UI they appear on
each stem asset (``stems/<strategy>/<stem>`` > Checks) and per partition.

On every stem:

- ``duration_matches_input`` (error): the stem is as long as the recording within
  :data:`DURATION_TOLERANCE_S` of its format. The worker writes every stem with the input's
  exact number of frames, and Stemset's reader gets that count back from every format (PCM and
  FLAC state it; the m4a writer records it in the MP4 edit list; Opus pre-skip and granule
  positions trim the codec delay). PCM formats therefore get half a sample. Lossy formats get
  one codec frame (AAC: 1024 samples = 23.2 ms; Opus: 20 ms), because players that ignore the
  edit list or end trimming decode up to one frame more or less.
- ``finite_samples`` (error): the model produced no NaN/Inf (the worker writes them as zeros
  and counts them in ``nonfinite_samples``).
- ``audible`` (warning): the stem's peak is above :data:`SILENCE_DBFS`. A silent stem can be
  right (no piano in a drum-and-bass take), hence a warning.

On the set (attached to its first stem, e.g. ``stems/htdemucs/drums``):

- ``set_complete`` (error): every stem the manifest lists is in the store with the size the
  manifest gives (the one state rule's ``broken`` test, :mod:`stemset_assets.core.state`); also
  evaluated by the ``stem_set_state`` sensor when objects vanish after the run.
- ``set_not_all_silent`` (error): at least one stem's peak is above :data:`SILENCE_DBFS`
  (unless the recording itself is silent).
- ``set_reconstructs_mix`` (error): the sum of the stems gives back the mix; the residual
  (mix - sum, relative to the mix) must be at most :data:`MAX_RESIDUAL_DB`.

Failing checks carry the figures (seconds, counts, dBFS, dB) in their metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue, PartitionsDefinition

from gpu_worker.job import SeparationResult

from .asset_keys import stem_asset_key

SAMPLE_RATE = 44100
DURATION_TOLERANCE_S: dict[str, float] = {
    "wav": 0.5 / SAMPLE_RATE,
    "flac": 0.5 / SAMPLE_RATE,
    "m4a": 1024 / SAMPLE_RATE,
    "opus": 0.020,
}
SILENCE_DBFS = -90.0
MAX_RESIDUAL_DB = -20.0

STEM_CHECKS = ("duration_matches_input", "finite_samples", "audible")
SET_COMPLETE = "set_complete"
SET_CHECKS = (SET_COMPLETE, "set_not_all_silent", "set_reconstructs_mix")


def check_specs(
    strategy: str, stems: Sequence[str], partitions_def: PartitionsDefinition | None = None
) -> list[AssetCheckSpec]:
    """The checks of one stem set: three on every stem, two set-level ones on the first stem."""
    descriptions = {
        "duration_matches_input": "The stem is as long as the recording (tolerance by format).",
        "finite_samples": "The model produced no NaN or Inf samples.",
        "audible": f"The stem's peak is above {SILENCE_DBFS:g} dBFS (a warning: silent stems can be right).",
        SET_COMPLETE: "Every stem the manifest lists is in the store, whole (else the set is broken).",
        "set_not_all_silent": f"At least one stem of the set peaks above {SILENCE_DBFS:g} dBFS.",
        "set_reconstructs_mix": f"Sum of the stems matches the mix: residual at most {MAX_RESIDUAL_DB:g} dB.",
    }
    with warnings.catch_warnings():  # partitioned checks are a Dagster preview feature
        warnings.simplefilter("ignore")
        specs = [
            AssetCheckSpec(
                name,
                asset=stem_asset_key(strategy, stem),
                description=descriptions[name],
                partitions_def=partitions_def,
            )
            for stem in stems
            for name in STEM_CHECKS
        ]
        specs += [
            AssetCheckSpec(
                name,
                asset=stem_asset_key(strategy, stems[0]),
                description=f"{descriptions[name]} Checks the whole stems_{strategy} set.",
                partitions_def=partitions_def,
            )
            for name in SET_CHECKS
        ]
    return specs


def _dbfs(value: float | None) -> float | MetadataValue:
    return MetadataValue.null() if value is None else round(float(value), 2)


def evaluate(
    strategy: str,
    stems: Sequence[str],
    manifest: SeparationResult,
    mix_peak_dbfs: float | None = None,
    incomplete: str | None = None,
) -> list[AssetCheckResult]:
    """Every check of the set, from a manifest; ``mix_peak_dbfs`` is the recording's peak;
    ``incomplete`` what the state rule found missing or short (None: the set is whole)."""
    results: list[AssetCheckResult] = [
        AssetCheckResult(
            asset_key=stem_asset_key(strategy, stems[0]),
            check_name=SET_COMPLETE,
            passed=incomplete is None,
            description=incomplete,
            metadata={"manifest": manifest.manifest_key, "stems": len(manifest.stems)},
        )
    ]
    expected_s = float(manifest.input_duration_s)
    audible = []
    for stem in stems:
        key = stem_asset_key(strategy, stem)
        f = manifest.stems.get(stem)
        if f is None:
            for name in STEM_CHECKS:
                results.append(
                    AssetCheckResult(
                        asset_key=key,
                        check_name=name,
                        passed=False,
                        description=f"The manifest lists no stem {stem!r}.",
                        metadata={"manifest": manifest.manifest_key},
                    )
                )
            continue
        tolerance = DURATION_TOLERANCE_S.get(f.format, 1024 / SAMPLE_RATE)
        diff = float(f.duration_s) - expected_s
        results.append(
            AssetCheckResult(
                asset_key=key,
                check_name="duration_matches_input",
                passed=abs(diff) <= tolerance,
                metadata={
                    "stem_duration_s": round(float(f.duration_s), 6),
                    "input_duration_s": round(expected_s, 6),
                    "difference_ms": round(diff * 1000, 3),
                    "tolerance_ms": round(tolerance * 1000, 3),
                    "format": f.format,
                },
            )
        )
        results.append(
            AssetCheckResult(
                asset_key=key,
                check_name="finite_samples",
                passed=int(f.nonfinite_samples) == 0,
                metadata={"nonfinite_samples": int(f.nonfinite_samples)},
            )
        )
        loud = f.peak_dbfs is not None and f.peak_dbfs > SILENCE_DBFS
        audible.append(loud)
        results.append(
            AssetCheckResult(
                asset_key=key,
                check_name="audible",
                passed=loud,
                severity=AssetCheckSeverity.WARN,
                metadata={"peak_dbfs": _dbfs(f.peak_dbfs), "threshold_dbfs": SILENCE_DBFS},
            )
        )

    first = stem_asset_key(strategy, stems[0])
    silent_mix = mix_peak_dbfs is not None and mix_peak_dbfs <= SILENCE_DBFS
    peaks = {s: _dbfs(manifest.stems[s].peak_dbfs) for s in stems if s in manifest.stems}
    results.append(
        AssetCheckResult(
            asset_key=first,
            check_name="set_not_all_silent",
            passed=any(audible) or silent_mix,
            metadata={
                "audible_stems": sum(audible),
                "stems": len(stems),
                "threshold_dbfs": SILENCE_DBFS,
                "mix_peak_dbfs": _dbfs(mix_peak_dbfs),
                "loudest_stem_peak_dbfs": _dbfs(
                    max(
                        (manifest.stems[s].peak_dbfs for s in peaks if manifest.stems[s].peak_dbfs is not None),
                        default=None,
                    )
                ),
                "peaks_dbfs": MetadataValue.json({s: manifest.stems[s].peak_dbfs for s in peaks}),
            },
        )
    )
    residual = manifest.residual_db
    results.append(
        AssetCheckResult(
            asset_key=first,
            check_name="set_reconstructs_mix",
            passed=residual is None or residual <= MAX_RESIDUAL_DB,
            description=None if residual is not None else "The mix is digitally silent: nothing to reconstruct.",
            metadata={"residual_db": _dbfs(residual), "max_residual_db": MAX_RESIDUAL_DB},
        )
    )
    return results

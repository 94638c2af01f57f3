"""Stemset's Dagster ``Definitions``, built from a config by :func:`build_definitions`.

- assets: ``recording`` -> ``stems/<strategy>/<stem>`` (one multi-asset per strategy) -> ``catalog``;
- asset checks: declared on each stem multi-asset (see :mod:`stemset_assets.defs.checks`);
- resources: ``media_store`` (config ``storage``) and ``separator`` (config ``gpu``);
- jobs ``process_<profile>``: ``recording`` plus the stems of that profile's default strategies,
  partitioned by ``recordings``;
- sensors: ``new_recordings`` and ``auto_reprocess_<strategy>`` (see :mod:`stemset_assets.defs.sensors`),
  ``stem_set_state`` (catalog refresh and ``set_complete``, :mod:`stemset_assets.defs.state_sensor`).

Building reads the model repo's small files (for fingerprints); it imports neither torch nor
Demucs: separation imports them when a run starts. :mod:`stemset_assets.definitions` is the
code location's entry point (Dagster's lazy ``@definitions``).
"""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, Definitions, define_asset_job

from ..config import StemsetConfig
from ..core.stemsets import fingerprints
from .asset_keys import RECORDING_KEY, stem_keys
from .assets.catalog import build_catalog_asset
from .assets.recording import recording
from .assets.stems import build_stems_asset
from .resources.media_store import MediaStoreResource
from .resources.separator import SeparatorResource
from .sensors import build_sensors
from .state_sensor import build_state_sensor


def process_job_name(profile: str) -> str:
    """``process_<profile>``: ``recording`` plus the stems of the profile's default strategies."""
    return f"process_{profile}"


def build_definitions(config: StemsetConfig, *, resources: dict[str, Any] | None = None) -> Definitions:
    """Definitions for ``config``; ``resources`` override the ones made from the config (tests
    pass their own media store)."""
    fps = fingerprints(config)
    stems = [build_stems_asset(config, name, fps[name]) for name in config.strategies]
    # One job per profile: a partition of profile P gets exactly P's default strategies.
    jobs = [
        define_asset_job(
            process_job_name(name),
            selection=AssetSelection.assets(RECORDING_KEY, *stem_keys(config, profile.strategies)),
            description=f"Canonicalise a recording of profile {name!r} and separate it with "
            f"{', '.join(profile.strategies) or 'no strategy'}.",
        )
        for name, profile in config.profiles.items()
    ]
    return Definitions(
        assets=[recording, *stems, build_catalog_asset(config)],
        jobs=jobs,
        sensors=[*build_sensors(config), build_state_sensor(config)],
        resources={
            "media_store": MediaStoreResource.from_config(config),
            "separator": SeparatorResource.from_config(config),
            **(resources or {}),
        },
    )

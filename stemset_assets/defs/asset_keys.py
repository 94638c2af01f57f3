"""The asset keys: ``recording``, ``stems/<strategy>/<stem>`` and ``catalog``."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from ..config import StemsetConfig

RECORDING_KEY = dg.AssetKey("recording")
CATALOG_KEY = dg.AssetKey("catalog")


def stem_asset_key(strategy: str, stem: str) -> dg.AssetKey:
    return dg.AssetKey(["stems", strategy, stem])


def stem_keys(config: StemsetConfig, strategy_names: Sequence[str] | None = None) -> list[dg.AssetKey]:
    """Every stem asset of ``strategy_names`` (default: every strategy in the config)."""
    names = config.strategies if strategy_names is None else strategy_names
    return [stem_asset_key(n, s) for n in names for s in config.strategy(n).stems]

"""Which strategies and profiles a command works on, checked against the config."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_worker.errors import StemsetError

from ..config import StemsetConfig


def check_strategies(config: StemsetConfig, strategies: Sequence[str] | None) -> list[str]:
    """``strategies`` (default: all in config), each one known, else a clear error naming the valid ones."""
    if strategies is None:
        return list(config.strategies)
    unknown = [s for s in strategies if s not in config.strategies]
    if unknown:
        raise StemsetError(
            f"Unknown strategy {', '.join(map(repr, unknown))}.",
            f"Use one of: {', '.join(config.strategies) or 'none'} (config.yaml `strategies`).",
        )
    return list(strategies)


def check_profile(config: StemsetConfig, profile: str | None) -> str | None:
    if profile is not None and profile not in config.profiles:
        raise StemsetError(
            f"Unknown profile {profile!r}.",
            f"Use one of: {', '.join(config.profiles) or 'none'} (config.yaml `profiles`).",
        )
    return profile

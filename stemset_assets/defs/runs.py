"""Launching Stemset's Dagster runs in this process: the CLI, the web API and backfills.

:func:`materialize_in_process` runs ``dagster.materialize`` against the configured instance, one
run per partition, one partition after another. The model cache lives in this process, so a
model loads once however many partitions follow. (Through a running webserver instead:
:mod:`stemset_assets.defs.webserver`.)

:func:`dagster_instance` picks the instance: ``$DAGSTER_HOME``'s, else a SQLite instance in
``./.dagster_home`` (created, and exported as ``DAGSTER_HOME`` so `dagster dev` started later
from the same folder sees the same runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

from gpu_worker.errors import StemsetError

from ..config import StemsetConfig
from ..core.run_tags import gpu_tags
from .asset_keys import CATALOG_KEY, RECORDING_KEY, stem_keys
from .build import build_definitions
from .partitions import register_partitions

DEFAULT_HOME = ".dagster_home"


@dataclass(frozen=True)
class RunOutcome:
    partition: str
    success: bool
    run_id: str | None = None
    error: str | None = None


def dagster_instance(config: StemsetConfig | None = None) -> DagsterInstance:
    """``$DAGSTER_HOME``'s instance, else a SQLite one in ``./.dagster_home`` (created)."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path(DEFAULT_HOME).absolute())
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return DagsterInstance.get()


def selection_for(config: StemsetConfig, strategies: Sequence[str], include_recording: bool = True) -> list[AssetKey]:
    """``recording`` (optionally) and every stem asset of ``strategies``."""
    unknown = [s for s in strategies if s not in config.strategies]
    if unknown:
        raise StemsetError(
            f"Unknown strategy {', '.join(map(repr, unknown))}.",
            f"Use one of: {', '.join(config.strategies)} (config.yaml `strategies`).",
        )
    return ([RECORDING_KEY] if include_recording else []) + list(stem_keys(config, list(strategies)))


def materialize_in_process(
    config: StemsetConfig,
    instance: DagsterInstance,
    partition_keys: Sequence[str],
    strategies: Sequence[str],
    *,
    include_recording: bool = True,
    resources: dict[str, Any] | None = None,
    progress: Callable[[int, int, RunOutcome], None] | None = None,
    tags: dict[str, str] | None = None,
) -> list[RunOutcome]:
    """Materialise ``recording`` (optionally) and the stems of ``strategies`` for each partition,
    one run per partition in this process; a failed partition does not stop the others.
    ``progress(done, total, outcome)`` is called after each."""
    selection = selection_for(config, strategies, include_recording)
    register_partitions(instance, partition_keys)
    defs = build_definitions(config, resources=resources)
    assets = list(defs.assets or [])
    outcomes: list[RunOutcome] = []
    for i, pk in enumerate(partition_keys):
        result = materialize(
            assets,
            selection=AssetSelection.assets(*selection),
            partition_key=pk,
            instance=instance,
            resources=dict(defs.resources or {}),
            raise_on_error=False,
            tags={"stemset/launched_by": "stemset", **gpu_tags(), **(tags or {})},
        )
        outcome = RunOutcome(pk, result.success, result.run_id, None if result.success else _failure_message(result))
        outcomes.append(outcome)
        if progress is not None:
            progress(i + 1, len(partition_keys), outcome)
    return outcomes


def materialize_catalog(
    config: StemsetConfig, instance: DagsterInstance, resources: dict[str, Any] | None = None
) -> RunOutcome:
    """Materialise the unpartitioned ``catalog`` asset in this process."""
    defs = build_definitions(config, resources=resources)
    result = materialize(
        list(defs.assets or []),
        selection=AssetSelection.assets(CATALOG_KEY),
        instance=instance,
        resources=dict(defs.resources or {}),
        raise_on_error=False,
        tags={"stemset/launched_by": "stemset"},
    )
    return RunOutcome("catalog", result.success, result.run_id, None if result.success else _failure_message(result))


def _failure_message(result) -> str:
    """The first step failure's user-facing text: a Failure's description, else the error's
    message without Dagster's exception class prefix."""
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return f"{event.step_key}: {data.user_failure_data.description.strip()}"
        if data.error is not None:
            return f"{event.step_key}: {data.error.message.strip().split(': ', 1)[-1]}"
    return "the run failed; see its logs in the Dagster UI"

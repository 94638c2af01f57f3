"""The ``stem_set_state`` sensor: keeps the catalog and the stems' ``set_complete`` check in step
with the one state rule, whatever changed the bucket.

Each tick (``sensors.interval_s``) it reads every set's state (:func:`~stemset_assets.defs.status.read_status`,
warm through the fact cache) and

- requests a run of ``catalog`` when any state, reason or stored set differs from the last tick
  (run key = the digest of the states, so one change makes one catalog run: the catalog stays
  current after sensor runs, backfills, CLI and API runs, and after objects vanish from the bucket);
- keeps the states it read for a wide ``stemset status``
  (:mod:`~stemset_assets.defs.status_snapshot`), so the CLI need not list the bucket again;
- records a failed ``set_complete`` check evaluation for every set that turned ``broken`` (a
  deleted manifest or stem object, a short stem), naming what is gone, and a passing one when such
  a set is whole again without a run (a run evaluates the check itself).
"""

# No `from __future__ import annotations`: Dagster reads the resource annotations at runtime.

import hashlib
import json
import time

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..config import StemsetConfig
from ..core.state import BROKEN
from ..core.status import SetStatus
from .asset_keys import CATALOG_KEY, stem_asset_key
from .checks import SET_COMPLETE
from .resources.media_store import MediaStoreResource
from .status import read_status
from .status_snapshot import save_snapshot

STEM_SET_STATE = "stem_set_state"


def states_digest(rows: list[SetStatus]) -> str:
    """Changes whenever any set's state, reasons or stored set changes."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: (r.partition, r.strategy)):
        h.update(f"{r.partition}|{r.strategy}|{r.state}|{r.reason}|{r.fingerprint}|{r.materialized_at}\n".encode())
    return h.hexdigest()[:16]


def check_evaluations(config: StemsetConfig, rows: list[SetStatus], was_broken: set[str]) -> list[AssetCheckEvaluation]:
    """``set_complete`` evaluations for sets that turned broken, or whole again, since last tick."""
    out = []
    for r in rows:
        pair = f"{r.partition}|{r.strategy}"
        broken = r.state == BROKEN
        if broken == (pair in was_broken):
            continue
        out.append(
            AssetCheckEvaluation(
                asset_key=stem_asset_key(r.strategy, config.strategy(r.strategy).stems[0]),
                check_name=SET_COMPLETE,
                passed=not broken,
                partition=r.partition,
                severity=AssetCheckSeverity.ERROR,
                description=r.detail if broken else "every stem the manifest lists is in place again",
                metadata={"state": r.state, "reason": r.reason},
            )
        )
    return out


def build_state_sensor(config: StemsetConfig) -> SensorDefinition:
    @sensor(
        name=STEM_SET_STATE,
        asset_selection=[CATALOG_KEY],
        minimum_interval_seconds=config.sensors.interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Re-materialises `catalog` when any stem set's state changed, and records `set_complete` "
            "for sets found broken in the bucket."
        ),
    )
    def stem_set_state(context: SensorEvaluationContext, media_store: MediaStoreResource):
        last = json.loads(context.cursor) if context.cursor else {}
        store, listed_at = media_store.get_store(), time.time()
        rows = read_status(context.instance, config, store=store)
        save_snapshot(context.instance, store, config, rows, listed_at)  # what a wide `stemset status` reads
        digest = states_digest(rows)
        was_broken = set(last.get("broken", []))
        events = check_evaluations(config, rows, was_broken)
        cursor = json.dumps(
            {"digest": digest, "broken": sorted(f"{r.partition}|{r.strategy}" for r in rows if r.state == BROKEN)}
        )
        if digest == last.get("digest"):
            return SensorResult(skip_reason=SkipReason("no stem set changed state"), cursor=cursor, asset_events=events)
        context.log.info(f"stem set states changed ({len(rows)} set(s)); refreshing the catalog")
        return SensorResult(
            run_requests=[
                RunRequest(
                    run_key=f"catalog@{digest}",
                    asset_selection=[CATALOG_KEY],
                    tags={"stemset/launched_by": STEM_SET_STATE},
                )
            ],
            asset_events=events,
            cursor=cursor,
        )

    return stem_set_state

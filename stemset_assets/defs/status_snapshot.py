"""A wide ``stemset status`` without listing the whole bucket each call.

Every whole status (each tick of the ``stem_set_state`` sensor, and a ``stemset status`` that
listed) saves its rows in the instance's key-value store
(:class:`~stemset_assets.core.status_snapshot.StatusSnapshot`). A later status over at least
:data:`MIN_PARTITIONS` recordings takes those rows when they are younger than :func:`max_age_s`
(two sensor ticks) and were decided under the same rule inputs, and re-reads from the bucket only
the recordings that may have changed since the listing began: those of every run Dagster recorded
as updated since then or still in progress (run storage is where Stemset's own writes come from:
assets, backfills, API and CLI jobs), and those registered since. Changes made behind Stemset's
back (an object deleted by hand) show at the next listing, at most :func:`max_age_s` later;
``stemset status --fresh`` lists at once.

Two keys per media store: the rows, rewritten only when they differ, and a small stamp that each
listing rewrites (when it ran, and which rows it found), so a daemon on a quiet bucket writes a
few bytes a tick rather than megabytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import pandas as pd
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.layout import OUTPUTS
from ..core.run_tags import PARTITION_RANGE_TAGS, PARTITION_TAG
from ..core.set_facts import NARROW_MAX
from ..core.status import SetStatus, columns_frame, status_rows
from ..core.status_snapshot import StatusSnapshot, merge, rule_digest
from .partitions import RECORDINGS_PARTITIONS
from .resources.media_store import open_store
from .status import read_status

SNAPSHOT_KEY = "stemset/status_snapshot/v1/"
MIN_PARTITIONS = 2_000  # fewer recordings list in a second or two: always list them
CLOCK_MARGIN_S = 60.0  # runs updated this long before the listing began count as changed too
MAX_REREAD = 200  # more changed recordings than this: list the whole bucket instead
MAX_RUNS = 1_000  # likewise for runs to look through
# Runs that may be writing now, whenever their record was last updated.
WRITING = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


@dataclass(frozen=True)
class StatusSource:
    """Where a whole status's rows come from."""

    listed_at: float  # when the listing they come from began
    reread: int  # recordings re-read from the bucket since that listing (from_snapshot only)
    from_snapshot: bool

    def describe(self) -> str:
        """What the status command says of kept rows."""
        age = max(0.0, time.time() - self.listed_at)
        return (
            f"from the bucket listing of {age:.0f} s ago, with {self.reread} recording(s) changed by runs "
            "since re-read; changes made outside Stemset since then show at the next listing "
            "(--fresh lists now)"
        )


def max_age_s(config: StemsetConfig) -> float:
    """How old a listing may be: two ticks of the sensor that makes one every tick, plus its run time."""
    return 2.0 * config.sensors.interval_s + 30.0


def _keys(store: ObjectStore) -> tuple[str, str]:
    base = SNAPSHOT_KEY + store.uri(OUTPUTS)
    return base, base + "#listed"


def save_snapshot(
    instance: DagsterInstance, store: ObjectStore, config: StemsetConfig, rows: Sequence[SetStatus], listed_at: float
) -> StatusSnapshot:
    """Keep ``rows``, a whole status (every registered recording and strategy) whose listing
    began at ``listed_at``, and return them as kept. Failing to store them costs a later call
    time, not correctness."""
    snap = StatusSnapshot.of_rows(rows, listed_at, rule_digest(config))
    rows_key, stamp_key = _keys(store)
    try:
        raw, rows_id = snap.encode()
        storage = instance.daemon_cursor_storage
        stamp = _stamp(storage.get_cursor_values({stamp_key}).get(stamp_key))
        values = {stamp_key: json.dumps({"rows_id": rows_id, "listed_at": listed_at})}
        if stamp.get("rows_id") != rows_id:
            values = {rows_key: raw, **values}
        storage.set_cursor_values(values)
    except Exception:  # noqa: BLE001 - see the docstring
        pass
    return snap


def load_snapshot(instance: DagsterInstance, store: ObjectStore) -> StatusSnapshot | None:
    """The kept rows, dated by the latest listing that found them; None if there are none."""
    rows_key, stamp_key = _keys(store)
    try:
        got = instance.daemon_cursor_storage.get_cursor_values({rows_key, stamp_key})
    except Exception:  # noqa: BLE001 - no usable store: list instead
        return None
    snap = StatusSnapshot.decode(got.get(rows_key))
    if snap is None:
        return None
    stamp = _stamp(got.get(stamp_key))
    if stamp.get("rows_id") == snap.rows_id and isinstance(stamp.get("listed_at"), (int, float)):
        return replace(snap, listed_at=max(snap.listed_at, float(stamp["listed_at"])))
    return snap


def _stamp(raw: str | None) -> dict:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def changed_partitions(instance: DagsterInstance, since: float, order: Sequence[str]) -> set[str] | None:
    """Partitions of the runs updated after ``since`` (less :data:`CLOCK_MARGIN_S`) or still in
    progress: the ones Stemset may have written since. A run over a partition range counts every
    partition of ``order`` (the registered ones, in order) in it. None when there are too many."""
    after = datetime.fromtimestamp(since - CLOCK_MARGIN_S, tz=timezone.utc)
    records = [
        *instance.get_run_records(RunsFilter(updated_after=after), limit=MAX_RUNS + 1),
        *instance.get_run_records(RunsFilter(statuses=WRITING), limit=MAX_RUNS + 1),
    ]
    if len(records) > MAX_RUNS:
        return None
    position: dict[str, int] = {}
    out: set[str] = set()
    for record in records:
        tags = record.dagster_run.tags
        start, end = (tags.get(t) for t in PARTITION_RANGE_TAGS)
        if tags.get(PARTITION_TAG):
            out.add(tags[PARTITION_TAG])
        elif start is not None and end is not None:
            position = position or {pk: i for i, pk in enumerate(order)}
            if start not in position or end not in position:
                return None  # a range over partitions no longer registered: list instead
            out.update(order[position[start] : position[end] + 1])
        if len(out) > MAX_REREAD:
            return None
    return out


def whole_status(
    instance: DagsterInstance,
    config: StemsetConfig,
    *,
    store: ObjectStore | None = None,
    fresh: bool = False,
    min_partitions: int | None = None,
) -> tuple[pd.DataFrame, StatusSource]:
    """Every registered recording x strategy (:data:`~stemset_assets.core.status.COLUMNS`), from
    the kept rows where that is safe (see the module), else listed now (and kept)."""
    store = store if store is not None else open_store(config)
    keys = [pk for pk in instance.get_dynamic_partitions(RECORDINGS_PARTITIONS) if "/" in pk]
    if not fresh and len(keys) >= (MIN_PARTITIONS if min_partitions is None else min_partitions):
        got = _from_snapshot(instance, store, config, keys)
        if got is not None:
            return got
    listed_at = time.time()
    rows = read_status(instance, config, store=store, partitions=keys)
    kept = save_snapshot(instance, store, config, rows, listed_at)
    return columns_frame(kept.columns), StatusSource(listed_at, 0, False)


def _from_snapshot(
    instance: DagsterInstance, store: ObjectStore, config: StemsetConfig, keys: list[str]
) -> tuple[pd.DataFrame, StatusSource] | None:
    snap = load_snapshot(instance, store)
    if snap is None or time.time() - snap.listed_at > max_age_s(config) or snap.digest != rule_digest(config):
        return None
    changed = changed_partitions(instance, snap.listed_at, keys)
    if changed is None:
        return None
    known = set(snap.columns["partition"])
    redo = [pk for pk in keys if pk in changed or pk not in known]
    if len(redo) > MAX_REREAD:
        return None
    fresh: list[SetStatus] = []
    for i in range(0, len(redo), NARROW_MAX):  # each call lists its recordings' own folders
        fresh += status_rows(store, config, redo[i : i + NARROW_MAX])
    columns = merge(snap, keys, fresh, redo)
    return columns_frame(columns), StatusSource(snap.listed_at, len(redo), True)

"""What separating has spent, read from the Dagster instance (no ledger of its own).

Recorded: the ``run_cost_usd`` metadata of the stems materialisations since the start of the UTC
month (one stem per strategy is read, since every stem of a set carries the set's cost; a reused
set records 0). Committed: runs not finished that carry :data:`~stemset_assets.core.run_tags.ESTIMATE_TAG`
and backfills still requested that carry :data:`~stemset_assets.core.run_tags.BACKFILL_ESTIMATE_TAG`,
each less what its runs have recorded so far. The rule that decides what fits is
:mod:`stemset_assets.core.spend_guard`.
"""

from __future__ import annotations

import time
from collections import defaultdict

from dagster import AssetRecordsFilter, DagsterInstance, DagsterRunStatus, RunsFilter

from ..config import StemsetConfig
from ..core.run_tags import BACKFILL_ESTIMATE_TAG, BACKFILL_ID_TAG, ESTIMATE_TAG
from ..core.spend_guard import Admission, Spending, admit, day_and_month
from .asset_keys import stem_asset_key

PAGE = 1000
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def _tag_usd(tags, key: str) -> float | None:
    try:
        return max(0.0, float(tags[key]))
    except (KeyError, TypeError, ValueError):
        return None


def recorded_costs(instance: DagsterInstance, config: StemsetConfig, since: float) -> list[tuple[float, str, float]]:
    """``[(timestamp, run id, US$)]`` of every stem set materialised since ``since`` (one stem per strategy)."""
    out: list[tuple[float, str, float]] = []
    for name, strategy in config.strategies.items():
        if not strategy.stems:
            continue
        key = stem_asset_key(name, strategy.stems[0])
        cursor = None
        while True:
            result = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=key, after_timestamp=since), limit=PAGE, cursor=cursor
            )
            for record in result.records:
                mat = record.asset_materialization
                meta = mat.metadata if mat is not None else {}
                value = meta.get("run_cost_usd", meta.get("cost_usd"))
                usd = float(getattr(value, "value", value) or 0.0) if value is not None else 0.0
                if usd > 0:
                    out.append((record.timestamp, record.run_id, usd))
            if not result.has_more:
                break
            cursor = result.cursor
    return out


def read_spending(instance: DagsterInstance, config: StemsetConfig, now: float | None = None) -> Spending:
    """What the day and month (UTC) have spent, and what launches in flight are estimated to add."""
    now = time.time() if now is None else now
    day_start, month_start = day_and_month(now)
    costs = recorded_costs(instance, config, month_start)
    by_run: dict[str, float] = defaultdict(float)
    day = month = 0.0
    for ts, run_id, usd in costs:
        month += usd
        if ts >= day_start:
            day += usd
        by_run[run_id] += usd
    committed, in_flight = 0.0, 0
    for run in instance.get_runs(filters=RunsFilter(statuses=UNFINISHED)):
        estimate = _tag_usd(run.tags, ESTIMATE_TAG)
        if estimate is None or BACKFILL_ID_TAG in run.tags:  # a backfill's runs count with their backfill
            continue
        left = estimate - by_run.get(run.run_id, 0.0)
        if left > 0:
            committed += left
            in_flight += 1
    for backfill in instance.get_backfills(limit=200):
        if backfill.status.value != "REQUESTED":
            continue
        estimate = _tag_usd(backfill.tags, BACKFILL_ESTIMATE_TAG)
        if estimate is None:
            continue
        runs = instance.get_run_ids(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
        left = estimate - sum(by_run.get(r, 0.0) for r in runs)
        if left > 0:
            committed += left
            in_flight += 1
    return Spending(day_usd=day, month_usd=month, committed_usd=committed, in_flight=in_flight)


def guard(instance: DagsterInstance, config: StemsetConfig, items, cost_of) -> Admission:
    """:func:`~stemset_assets.core.spend_guard.admit` ``items`` against the budget and what the
    instance says was spent; reads nothing when there is no budget or nothing costs anything."""
    items = list(items)
    if not config.budget.limited or not any(cost_of(i) > 0 for i in items):
        return Admission(admitted=items, admitted_usd=sum(max(0.0, cost_of(i)) for i in items))
    return admit(items, cost_of, config.budget, read_spending(instance, config))

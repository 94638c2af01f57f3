"""Per-file staleness of every stem set, from Dagster's materialisation metadata.

For each strategy and each partition of ``recordings``, :func:`staleness` says whether the
stem set is

- ``current``: its latest materialisation carries the strategy's current fingerprint and was
  made from the recording's latest data version (input sha256);
- ``stale``: made with another fingerprint (``strategy_changed``), from an older recording
  (``recording_changed``), or the input object was rewritten after the recording was last
  materialised (``input_changed``: the listing's ETag differs from the ``input_etag`` the
  recording recorded, so the new content is not canonicalised yet);
- ``missing``: registered but never separated with this strategy (``not_separated``).

A deleted input keeps its partition: the row is reported with ``input_missing`` among its
reasons and ``input_present`` False, whatever its state.

``input_changed`` is the ETag comparison: on S3 the ETag is the content's MD5 (single-part
uploads), so a re-upload of identical bytes is not a change; on local storage it is
``size-mtime-inode`` (:class:`gpu_worker.stores.local.LocalObjectStore`), so a ``touch`` counts as a
rewrite until the recording is re-materialised (which then keeps its FLAC: same sha256).
Recording materialisations made before ``input_etag`` was recorded fall back to the old guess:
modified more than :data:`MTIME_SLACK_S` after the materialisation, or another size.

How it scales (10,000 partitions): per asset key (``recording`` and each strategy's first stem;
the set is materialised as a whole), one query for the latest materialisation's storage id of
every partition (:meth:`DagsterInstance.get_latest_storage_id_by_partition`). The few facts
used here (:data:`RECORDING_FACTS`, :data:`STEM_FACTS` and the timestamp) are kept per
partition in the instance's key-value store (``daemon_cursor_storage``, one value per asset
key), each entry under the storage id it was read from: events never change, so an entry is
valid exactly while its storage id is still the partition's latest, and only the partitions
materialised since the last call are read from the event log (by storage id, :data:`PAGE` at a
time). Plus one listing of ``inputs/<profile>/`` per profile. No per-partition instance query
and no per-partition bucket round trip; the first call after N new materialisations pays for
deserialising those N events once (about 1 ms each, the recording's carrying its inline
waveform image).

:func:`staleness` returns a pandas DataFrame (columns :data:`COLUMNS`), :func:`partition_states`
the same rows as :class:`~stemset_assets.core.stemsets.PartitionState`; the states and reasons are
named in :mod:`stemset_assets.core.stemsets`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance, EventLogRecord

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.partition_keys import assign_partition_keys, list_inputs, split_partition_key
from ..core.selection import check_profile, check_strategies
from ..core.stemsets import (
    CURRENT,
    INPUT_CHANGED,
    INPUT_MISSING,
    MISSING,
    NOT_RECORDED,
    NOT_SEPARATED,
    RECORDING_CHANGED,
    STALE,
    STALE_REASONS,
    STRATEGY_CHANGED,
    UP_TO_DATE,
    PartitionState,
    StrategyHistory,
    fingerprints,
)
from .asset_keys import RECORDING_KEY, stem_asset_key
from .partitions import RECORDINGS_PARTITIONS
from .resources.media_store import open_store

PAGE = 500
"""Storage ids per records query (well under SQLite's bound-parameter limit)."""
MTIME_SLACK_S = 2.0
"""An input modified this long after its recording's materialisation counts as rewritten
(clock skew between the bucket and this machine)."""

COLUMNS = [
    "partition", "profile", "strategy", "state", "reason", "duration_s", "input_present", "original_key",
    "fingerprint", "current_fingerprint", "input_sha256", "recording_sha256", "backend", "billed_seconds",
    "cost_usd", "materialized_at",
]


# --------------------------------------------------------------------------- instance reads


RECORDING_FACTS = ("sha256", "duration_s", "original_key", "input_etag", "input_bytes")
"""Metadata of the ``recording`` materialisations that staleness uses."""
STEM_FACTS = ("fingerprint", "input_sha256", "duration_s", "billed_seconds", "cost_usd", "backend")
"""Metadata of a stem materialisation that staleness uses (read from the strategy's first stem)."""
CACHE_KEY = "stemset/staleness/v1/"
"""Prefix of the key-value store entries holding the facts, one per asset key."""
TIMESTAMP = "timestamp"


def _facts(record: EventLogRecord, fields: Sequence[str]) -> dict[str, Any]:
    metadata = record.asset_materialization.metadata if record.asset_materialization is not None else {}
    out: dict[str, Any] = {TIMESTAMP: record.timestamp}
    for name in fields:
        value = metadata.get(name)
        out[name] = None if value is None else value.value
    return out


def _cache_read(instance: DagsterInstance, key: str, fields: Sequence[str]) -> dict[str, list]:
    """``{partition: [storage id, timestamp, *fields]}`` as last stored, or empty when there is
    none, it was written for other fields, or the instance has no key-value store."""
    try:
        raw = instance.daemon_cursor_storage.get_cursor_values({key}).get(key)
        stored = json.loads(raw) if raw else {}
    except Exception:  # noqa: BLE001 - a cache: an instance without a usable store just reads the events
        return {}
    if not isinstance(stored, dict) or stored.get("fields") != list(fields):
        return {}
    rows = stored.get("rows")
    return rows if isinstance(rows, dict) else {}


def _cache_write(instance: DagsterInstance, key: str, fields: Sequence[str], rows: dict[str, list]) -> None:
    try:
        instance.daemon_cursor_storage.set_cursor_values(
            {key: json.dumps({"fields": list(fields), "rows": rows}, separators=(",", ":"))})
    except Exception:  # noqa: BLE001 - a cache: failing to store it costs the next call time, not correctness
        pass


def latest_facts(instance: DagsterInstance, asset_key: AssetKey, fields: Sequence[str],
                 partitions: Iterable[str] | None = None, *, cache: bool = True) -> dict[str, dict[str, Any]]:
    """``{partition: {field: metadata value, "timestamp": ...}}`` of each partition's latest
    materialisation of ``asset_key``: one latest-id query, then the facts from the cache for the
    partitions whose latest event is the cached one, and from the event log (by storage id,
    :data:`PAGE` at a time) for the others, which then join the cache."""
    ids = instance.get_latest_storage_id_by_partition(asset_key, DagsterEventType.ASSET_MATERIALIZATION)
    wanted = ids if partitions is None else {pk: ids[pk] for pk in set(partitions) if pk in ids}
    key = CACHE_KEY + asset_key.to_user_string()
    stored = _cache_read(instance, key, fields) if cache else {}
    out: dict[str, dict[str, Any]] = {}
    todo: list[int] = []
    for pk, sid in wanted.items():
        hit = stored.get(pk)
        if hit is not None and hit[0] == sid:
            out[pk] = dict(zip((TIMESTAMP, *fields), hit[1:], strict=False))
        else:
            todo.append(sid)
    todo.sort()
    fresh: dict[str, list] = {}
    for start in range(0, len(todo), PAGE):
        chunk = todo[start:start + PAGE]
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset_key, storage_ids=chunk), limit=len(chunk)
        )
        for record in result.records:
            if record.partition_key is not None:
                facts = _facts(record, fields)
                out[record.partition_key] = facts
                fresh[record.partition_key] = [record.storage_id, *(facts[f] for f in (TIMESTAMP, *fields))]
    if cache:
        kept = {pk: row for pk, row in stored.items() if ids.get(pk) == row[0]}
        if fresh or len(kept) != len(stored):
            _cache_write(instance, key, fields, {**kept, **fresh})
    return out


# --------------------------------------------------------------------------- the computation


def _inputs_by_partition(store: ObjectStore, profiles: Iterable[str], partitions: Sequence[str],
                         original_keys: Mapping[str, str]) -> dict[str, Any]:
    """``{partition: ObjectInfo}`` for the inputs present, one listing per profile. A
    materialised partition is matched by its recorded object key, others as the sensor keys them
    (that assignment is skipped when every partition has a recorded key)."""
    out: dict[str, Any] = {}
    for profile in profiles:
        infos = list_inputs(store, profile)
        by_key = {info.key: info for info in infos}
        mine = [pk for pk in partitions if pk.startswith(f"{profile}/")]
        by_partition: dict[str, Any] = {}
        if any(pk not in original_keys for pk in mine):
            keyed = assign_partition_keys(profile, infos, mine)
            by_partition = {pk: by_key[obj] for obj, pk in keyed.items()}
        for pk in mine:
            original = original_keys.get(pk)
            info = by_key.get(original) if original else by_partition.get(pk)
            if info is not None:
                out[pk] = info
    return out


def input_changed(rec: Mapping[str, Any], info: Any) -> bool:
    """Whether the input object ``info`` (from the listing) was rewritten since the recording
    ``rec`` (its facts) read it: another ETag than the recorded ``input_etag``; for recordings
    made before that was recorded, modified after the materialisation or another size."""
    etag = rec.get("input_etag")
    if etag is not None:
        return str(etag) != info.etag
    size = rec.get("input_bytes")
    return info.last_modified > rec[TIMESTAMP] + MTIME_SLACK_S or (size is not None and int(size) != info.size)


def partition_states(instance: DagsterInstance, config: StemsetConfig, strategies: Sequence[str] | None = None,
                     profile: str | None = None, *, store: ObjectStore | None = None, check_inputs: bool = True,
                     partitions: Sequence[str] | None = None,
                     history: dict[str, StrategyHistory] | None = None) -> list[PartitionState]:
    """Every partition x strategy (optionally one profile's partitions), as :class:`PartitionState`.

    ``store``: the media store to list inputs from (default: the configured one); with
    ``check_inputs=False`` no listing is made (``input_changed`` / ``input_missing`` are not
    detected). ``history``, when given, is filled with each strategy's recorded billed seconds.
    """
    names = check_strategies(config, strategies)
    check_profile(config, profile)
    keys = list(partitions) if partitions is not None else list(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
    if profile is not None:
        keys = [k for k in keys if k.startswith(f"{profile}/")]
    fps = fingerprints(config)
    recordings = latest_facts(instance, RECORDING_KEY, RECORDING_FACTS, keys)
    original_keys = {pk: rec["original_key"] for pk, rec in recordings.items() if rec.get("original_key")}

    inputs: dict[str, Any] | None = None
    if check_inputs:
        if store is None:
            store = open_store(config)
        profiles = sorted({pk.partition("/")[0] for pk in keys})
        inputs = _inputs_by_partition(store, profiles, keys, original_keys)

    none: dict[str, Any] = {}
    rows: list[PartitionState] = []
    for name in names:
        first_stem = config.strategy(name).stems[0]
        stems = latest_facts(instance, stem_asset_key(name, first_stem), STEM_FACTS, keys)
        hist = StrategyHistory()
        for pk in keys:
            rec, st = recordings.get(pk), stems.get(pk)
            rf, sf = rec or none, st or none  # facts (empty when never materialised)
            try:
                prof, _ = split_partition_key(pk)
            except ValueError:
                continue
            rec_sha = rf.get("sha256")
            duration = rf.get("duration_s")
            if duration is None:
                duration = sf.get("duration_s")
            reasons: list[str] = []
            if st is None:
                state = MISSING
                reasons.append(NOT_RECORDED if rec is None else NOT_SEPARATED)
            else:
                if sf.get("fingerprint") != fps[name]:
                    reasons.append(STRATEGY_CHANGED)
                if rec_sha is not None and sf.get("input_sha256") != rec_sha:
                    reasons.append(RECORDING_CHANGED)
                billed, audio = sf.get("billed_seconds"), sf.get("duration_s")
                if billed and audio:
                    hist.runs += 1
                    hist.audio_seconds += float(audio)
                    hist.billed_seconds += float(billed)
                    b = str(sf.get("backend") or "local")
                    a0, b0 = hist.by_backend.get(b, (0.0, 0.0))
                    hist.by_backend[b] = (a0 + float(audio), b0 + float(billed))
            present: bool | None = None
            if inputs is not None:
                info = inputs.get(pk)
                present = info is not None
                if info is None:
                    reasons.append(INPUT_MISSING)
                elif rec is not None and input_changed(rec, info):
                    reasons.append(INPUT_CHANGED)
            if st is not None:
                state = STALE if STALE_REASONS.intersection(reasons) else CURRENT
            rows.append(PartitionState(
                partition=pk, profile=prof, strategy=name, state=state,
                reason=";".join(reasons) or UP_TO_DATE,
                duration_s=None if duration is None else float(duration), input_present=present,
                original_key=original_keys.get(pk), fingerprint=sf.get("fingerprint"),
                current_fingerprint=fps[name], input_sha256=sf.get("input_sha256"), recording_sha256=rec_sha,
                backend=sf.get("backend"), billed_seconds=sf.get("billed_seconds"),
                cost_usd=sf.get("cost_usd"), materialized_at=sf.get(TIMESTAMP),
            ))
        if history is not None:
            history[name] = hist
    return rows


def staleness(instance: DagsterInstance, config: StemsetConfig, strategies: Sequence[str] | None = None,
              profile: str | None = None, **kwargs: Any) -> pd.DataFrame:
    """:func:`partition_states` as a DataFrame, one row per partition x strategy (columns :data:`COLUMNS`)."""
    rows = partition_states(instance, config, strategies, profile, **kwargs)
    return pd.DataFrame([vars(r) for r in rows], columns=COLUMNS)  # flat scalars: no asdict deep copy


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Counts per profile x strategy: current, stale, missing, total, audio hours, input_missing."""
    cols = ["profile", "strategy", CURRENT, STALE, MISSING, "total", "audio_hours", "inputs_missing"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (prof, name), group in df.groupby(["profile", "strategy"], sort=True):
        counts = group["state"].value_counts()
        rows.append({
            "profile": prof, "strategy": name,
            CURRENT: int(counts.get(CURRENT, 0)), STALE: int(counts.get(STALE, 0)), MISSING: int(counts.get(MISSING, 0)),
            "total": len(group), "audio_hours": round(float(group["duration_s"].fillna(0).sum()) / 3600, 3),
            "inputs_missing": int((group["input_present"] == False).sum()),  # noqa: E712 - None is not False
        })
    return pd.DataFrame(rows, columns=cols)

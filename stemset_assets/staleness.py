"""Per-file staleness of every stem set, from Dagster's materialisation metadata.

For each strategy and each partition of ``recordings``, :func:`staleness` says whether the
stem set is

- ``current``: its latest materialisation carries the strategy's current fingerprint and was
  made from the recording's latest data version (input sha256);
- ``stale``: made with another fingerprint (``strategy_changed``), from an older recording
  (``recording_changed``), or the input object was rewritten after the recording was last
  materialised (``input_changed``: the new content is not canonicalised yet);
- ``missing``: registered but never separated with this strategy (``not_separated``).

A deleted input keeps its partition: the row is reported with ``input_missing`` among its
reasons and ``input_present`` False, whatever its state.

How it scales (10,000 partitions): per asset key, one query for the latest materialisation's
storage id of every partition (:meth:`DagsterInstance.get_latest_storage_id_by_partition`),
then those records fetched by storage id in pages of :data:`PAGE`; the stem set is read
through its first stem's asset key (the set is materialised as a whole). Plus one listing of
``inputs/<profile>/`` per profile. No per-partition instance query and no per-partition
bucket round trip.

Module import is Dagster-free apart from types; :func:`staleness` returns a pandas DataFrame
(columns :data:`COLUMNS`), :func:`partition_states` the same rows as dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import StemsetError

from .partitions import RECORDINGS_PARTITIONS, assign_partition_keys, list_inputs, split_partition_key
from .stemsets import CURRENT, MISSING, STALE

if TYPE_CHECKING:
    import pandas as pd
    from dagster import AssetKey, DagsterInstance, EventLogRecord

    from gpu_worker.objects import ObjectStore

    from .config import StemsetConfig

PAGE = 500
"""Storage ids per records query (well under SQLite's bound-parameter limit)."""
MTIME_SLACK_S = 2.0
"""An input modified this long after its recording's materialisation counts as rewritten
(clock skew between the bucket and this machine)."""

STRATEGY_CHANGED = "strategy_changed"
RECORDING_CHANGED = "recording_changed"
INPUT_CHANGED = "input_changed"
INPUT_MISSING = "input_missing"
NOT_SEPARATED = "not_separated"
NOT_RECORDED = "recording_not_materialised"
UP_TO_DATE = "up_to_date"

COLUMNS = [
    "partition", "profile", "strategy", "state", "reason", "duration_s", "input_present", "original_key",
    "fingerprint", "current_fingerprint", "input_sha256", "recording_sha256", "backend", "billed_seconds",
    "cost_usd", "materialized_at",
]


@dataclass(frozen=True)
class PartitionState:
    """One partition x strategy."""

    partition: str
    profile: str
    strategy: str
    state: str  # current | stale | missing
    reason: str  # ";"-joined reason tokens (see the module doc)
    duration_s: float | None  # audio seconds (None when the recording was never materialised)
    input_present: bool | None  # None when the inputs were not listed
    original_key: str | None = None
    fingerprint: str | None = None  # of the latest stem set
    current_fingerprint: str = ""
    input_sha256: str | None = None  # the recording data version the stem set was made from
    recording_sha256: str | None = None  # the recording's latest data version
    backend: str | None = None
    billed_seconds: float | None = None
    cost_usd: float | None = None
    materialized_at: float | None = None

    @property
    def reasons(self) -> list[str]:
        return self.reason.split(";") if self.reason else []


@dataclass
class StrategyHistory:
    """What the latest materialisations of one strategy's stem sets recorded, for cost estimates."""

    runs: int = 0
    audio_seconds: float = 0.0
    billed_seconds: float = 0.0
    by_backend: dict[str, tuple[float, float]] = field(default_factory=dict)  # backend -> (audio s, billed s)

    def billed_per_audio_second(self, backend: str) -> float | None:
        audio, billed = self.by_backend.get(backend, (0.0, 0.0))
        return billed / audio if audio > 0 and billed > 0 else None


# --------------------------------------------------------------------------- instance reads


def latest_materializations(instance: "DagsterInstance", asset_key: "AssetKey",
                            partitions: Iterable[str] | None = None) -> dict[str, "EventLogRecord"]:
    """``{partition: latest materialisation record}`` of ``asset_key``: one latest-id query,
    then the records by storage id, :data:`PAGE` at a time."""
    from dagster import AssetRecordsFilter, DagsterEventType

    ids = instance.get_latest_storage_id_by_partition(asset_key, DagsterEventType.ASSET_MATERIALIZATION)
    if partitions is not None:
        wanted = set(partitions)
        ids = {pk: sid for pk, sid in ids.items() if pk in wanted}
    ordered = sorted(ids.values())
    out: dict[str, EventLogRecord] = {}
    for start in range(0, len(ordered), PAGE):
        chunk = ordered[start:start + PAGE]
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset_key, storage_ids=chunk), limit=len(chunk)
        )
        for record in result.records:
            if record.partition_key is not None:
                out[record.partition_key] = record
    return out


def _meta(record: "EventLogRecord | None", key: str, default: Any = None) -> Any:
    if record is None or record.asset_materialization is None:
        return default
    value = record.asset_materialization.metadata.get(key)
    return default if value is None or value.value is None else value.value


# --------------------------------------------------------------------------- checks of names


def check_strategies(config: "StemsetConfig", strategies: Sequence[str] | None) -> list[str]:
    """``strategies`` (default: all in config), each one known, else a clear error naming the valid ones."""
    if strategies is None:
        return list(config.strategies)
    unknown = [s for s in strategies if s not in config.strategies]
    if unknown:
        raise StemsetError(f"Unknown strategy {', '.join(map(repr, unknown))}.",
                           f"Use one of: {', '.join(config.strategies) or 'none'} (config.yaml `strategies`).")
    return list(strategies)


def check_profile(config: "StemsetConfig", profile: str | None) -> str | None:
    if profile is not None and profile not in config.profiles:
        raise StemsetError(f"Unknown profile {profile!r}.",
                           f"Use one of: {', '.join(config.profiles) or 'none'} (config.yaml `profiles`).")
    return profile


# --------------------------------------------------------------------------- the computation


def _inputs_by_partition(store: "ObjectStore", profiles: Iterable[str], partitions: Sequence[str],
                         original_keys: Mapping[str, str]) -> dict[str, Any]:
    """``{partition: ObjectInfo}`` for the inputs present, one listing per profile. A
    materialised partition is matched by its recorded object key, others as the sensor keys them."""
    out: dict[str, Any] = {}
    for profile in profiles:
        infos = list_inputs(store, profile)
        by_key = {info.key: info for info in infos}
        mine = [pk for pk in partitions if pk.startswith(f"{profile}/")]
        keyed = assign_partition_keys(profile, infos, mine)
        by_partition = {pk: by_key[obj] for obj, pk in keyed.items()}
        for pk in mine:
            original = original_keys.get(pk)
            info = by_key.get(original) if original else by_partition.get(pk)
            if info is not None:
                out[pk] = info
    return out


def partition_states(instance: "DagsterInstance", config: "StemsetConfig", strategies: Sequence[str] | None = None,
                     profile: str | None = None, *, store: "ObjectStore | None" = None, check_inputs: bool = True,
                     partitions: Sequence[str] | None = None,
                     history: dict[str, StrategyHistory] | None = None) -> list[PartitionState]:
    """Every partition x strategy (optionally one profile's partitions), as :class:`PartitionState`.

    ``store``: the media store to list inputs from (default: the configured one); with
    ``check_inputs=False`` no listing is made (``input_changed`` / ``input_missing`` are not
    detected). ``history``, when given, is filled with each strategy's recorded billed seconds.
    """
    from dagster import AssetKey

    from .assets.stems import fingerprints
    from .checks import stem_asset_key

    names = check_strategies(config, strategies)
    check_profile(config, profile)
    keys = list(partitions) if partitions is not None else list(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
    if profile is not None:
        keys = [k for k in keys if k.startswith(f"{profile}/")]
    fps = fingerprints(config)
    recordings = latest_materializations(instance, AssetKey("recording"), keys)
    original_keys = {pk: _meta(rec, "original_key") for pk, rec in recordings.items() if _meta(rec, "original_key")}

    inputs: dict[str, Any] | None = None
    if check_inputs:
        if store is None:
            from .intake import open_store

            store = open_store(config)
        profiles = sorted({pk.partition("/")[0] for pk in keys})
        inputs = _inputs_by_partition(store, profiles, keys, original_keys)

    rows: list[PartitionState] = []
    for name in names:
        first_stem = config.strategy(name).stems[0]
        stems = latest_materializations(instance, stem_asset_key(name, first_stem), keys)
        hist = StrategyHistory()
        for pk in keys:
            rec, st = recordings.get(pk), stems.get(pk)
            try:
                prof, _ = split_partition_key(pk)
            except ValueError:
                continue
            rec_sha = _meta(rec, "sha256")
            duration = _meta(rec, "duration_s", _meta(st, "duration_s"))
            reasons: list[str] = []
            if st is None:
                state = MISSING
                reasons.append(NOT_RECORDED if rec is None else NOT_SEPARATED)
            else:
                if _meta(st, "fingerprint") != fps[name]:
                    reasons.append(STRATEGY_CHANGED)
                if rec_sha is not None and _meta(st, "input_sha256") != rec_sha:
                    reasons.append(RECORDING_CHANGED)
                billed, audio = _meta(st, "billed_seconds"), _meta(st, "duration_s")
                if billed and audio:
                    hist.runs += 1
                    hist.audio_seconds += float(audio)
                    hist.billed_seconds += float(billed)
                    b = str(_meta(st, "backend", "local"))
                    a0, b0 = hist.by_backend.get(b, (0.0, 0.0))
                    hist.by_backend[b] = (a0 + float(audio), b0 + float(billed))
            present: bool | None = None
            if inputs is not None:
                info = inputs.get(pk)
                present = info is not None
                if info is None:
                    reasons.append(INPUT_MISSING)
                elif rec is not None and (
                    info.last_modified > rec.timestamp + MTIME_SLACK_S
                    or (_meta(rec, "input_bytes") is not None and int(_meta(rec, "input_bytes")) != info.size)
                ):
                    reasons.append(INPUT_CHANGED)
            if st is not None:
                state = STALE if any(r in (STRATEGY_CHANGED, RECORDING_CHANGED, INPUT_CHANGED) for r in reasons) else CURRENT
            rows.append(PartitionState(
                partition=pk, profile=prof, strategy=name, state=state,
                reason=";".join(reasons) or UP_TO_DATE,
                duration_s=None if duration is None else float(duration), input_present=present,
                original_key=original_keys.get(pk), fingerprint=_meta(st, "fingerprint"),
                current_fingerprint=fps[name], input_sha256=_meta(st, "input_sha256"), recording_sha256=rec_sha,
                backend=_meta(st, "backend"), billed_seconds=_meta(st, "billed_seconds"),
                cost_usd=_meta(st, "cost_usd"), materialized_at=st.timestamp if st is not None else None,
            ))
        if history is not None:
            history[name] = hist
    return rows


def staleness(instance: "DagsterInstance", config: "StemsetConfig", strategies: Sequence[str] | None = None,
              profile: str | None = None, **kwargs: Any) -> "pd.DataFrame":
    """:func:`partition_states` as a DataFrame, one row per partition x strategy (columns :data:`COLUMNS`)."""
    import pandas as pd

    rows = partition_states(instance, config, strategies, profile, **kwargs)
    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


def summary(df: "pd.DataFrame") -> "pd.DataFrame":
    """Counts per profile x strategy: current, stale, missing, total, audio hours, input_missing."""
    import pandas as pd

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

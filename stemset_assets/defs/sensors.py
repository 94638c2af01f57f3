"""Sensors: ``new_recordings`` (new inputs in the bucket) and ``auto_reprocess_<strategy>`` (stale stem sets).

``new_recordings``, each tick:

1. lists ``inputs/<profile>/`` once per configured profile (:func:`~stemset_assets.core.partition_keys.list_inputs`)
   and loads the ``recordings`` partitions once;
2. skips, with the reason logged: names that are not audio (:data:`stemset_assets.core.uploads.AUDIO_EXTENSIONS`), zero-byte
   objects, and uploads in progress: temporary names (:data:`TEMP_SUFFIXES`, ``~``/``.`` prefixes)
   or objects modified less than ``sensors.settle_s`` seconds ago (they are looked at again next tick);
3. takes the not yet handled objects, oldest first, at most ``sensors.max_new_per_tick``, adds
   their new partition keys in one ``SensorResult(dynamic_partitions_requests=[...])`` and
   requests a run of ``recording`` plus the profile's strategies' stems per object, with
   ``run_key = "<partition>@<etag>@<etag the recording was made from, or new>"``: a re-upload
   with other content runs again, content that comes back (A, then B, then A) runs again because
   the recording now holds B, and an object whose recording already holds its ETag is not run
   (so the same upload never runs twice, even with a lost cursor).

The cursor is the set of objects handled, as 6-byte digests of ``key + etag`` (base64, about
8 bytes an object: 80 KB for 10,000 inputs), pruned to the objects still listed. A backlog
drains ``max_new_per_tick`` at a time with none missed and none twice; a deleted input leaves
its partition as it is.

``auto_reprocess_<strategy>`` exists for each strategy under ``sensors.auto_reprocess``
(running by default when ``enabled: true``, else stopped until started in the UI). Each tick
it reads the strategy's states (:func:`~stemset_assets.defs.status.read_status`, the one rule) and
requests runs for at most ``max_per_tick`` stale or broken partitions that can be redone, while the day's
(UTC) estimated cost stays under ``daily_cost_ceiling_usd`` (estimate: audio seconds x recorded
billed seconds per audio second, else ``backfill.billed_seconds_per_audio_second``, x the GPU
price). Its run key names the partition and the fingerprint and recording it targets.
"""

# No `from __future__ import annotations`: Dagster reads the resource annotations at runtime.

import base64
import hashlib
import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import PurePosixPath

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from gpu_worker.stores.base import ObjectInfo

from ..config import StemsetConfig
from ..core.backfill_plan import NEEDS_RECORDING, cost_model
from ..core.layout import RECORD_NAME, RECORDINGS, read_record
from ..core.partition_keys import assign_partition_keys, list_inputs, relative_name
from ..core.run_tags import estimate_tag, gpu_tags
from ..core.spend_guard import audio_seconds_from_size
from ..core.state import BROKEN, STALE
from ..core.status import history
from ..core.uploads import AUDIO_EXTENSIONS
from .asset_keys import RECORDING_KEY, stem_keys
from .partitions import RECORDINGS_PARTITIONS, recordings
from .resources.media_store import MediaStoreResource
from .spending import guard
from .status import read_status

NEW_RECORDINGS = "new_recordings"
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".upload", ".uploading", ".filepart")
DIGEST_BYTES = 6
LOG_EXAMPLES = 5


# --------------------------------------------------------------------------- new inputs


def object_digest(key: str, etag: str) -> bytes:
    return hashlib.sha256(f"{key}\0{clean_etag(etag)}".encode()).digest()[:DIGEST_BYTES]


def clean_etag(etag: str) -> str:
    return (etag or "").strip('"')


def encode_cursor(handled: set[bytes]) -> str:
    return json.dumps({"v": 1, "handled": base64.b64encode(b"".join(sorted(handled))).decode()})


def decode_cursor(cursor: str | None) -> set[bytes]:
    if not cursor:
        return set()
    try:
        raw = base64.b64decode(json.loads(cursor)["handled"])
    except (ValueError, KeyError, TypeError):
        return set()  # an unreadable cursor starts over; run keys still stop repeats
    return {raw[i : i + DIGEST_BYTES] for i in range(0, len(raw) - DIGEST_BYTES + 1, DIGEST_BYTES)}


def skip_reason(profile: str, info: ObjectInfo, now: float, settle_s: float) -> str | None:
    """Why ``info`` is not (yet) a recording to process, or None when it is."""
    name = PurePosixPath(relative_name(profile, info.key)).name
    lower = name.lower()
    if lower.startswith("~") or lower.endswith(TEMP_SUFFIXES) or lower.endswith("~"):
        return "upload in progress (temporary name)"
    if PurePosixPath(lower).suffix not in AUDIO_EXTENSIONS:
        return "not an audio file name"
    if info.size <= 0:
        return "zero bytes"
    if now - info.last_modified < settle_s:
        return f"upload in progress (modified {max(0.0, now - info.last_modified):.0f} s ago, settle_s {settle_s:g})"
    return None


def scan_new_inputs(
    config: StemsetConfig, store, existing: list[str], handled: set[bytes], now: float, log=None
) -> tuple[list[tuple[str, ObjectInfo, str]], set[bytes], Counter]:
    """The new-input decision, without Dagster: ``([(profile, object, partition key)], new handled, skips)``.

    One listing per profile; at most ``sensors.max_new_per_tick`` objects, oldest first."""
    limit = config.sensors.max_new_per_tick
    settle = config.sensors.settle_s
    listed: set[bytes] = set()
    candidates: list[tuple[str, ObjectInfo, list[ObjectInfo]]] = []
    skips: Counter = Counter()
    examples: dict[str, list[str]] = {}
    keys_by_profile: dict[str, list[ObjectInfo]] = {}
    for profile in config.profiles:
        infos = list_inputs(store, profile)
        usable: list[ObjectInfo] = []
        for info in infos:
            digest = object_digest(info.key, info.etag)
            listed.add(digest)
            why = skip_reason(profile, info, now, settle)
            if why is not None:
                kind = why.split(" (")[0]
                skips[kind] += 1
                examples.setdefault(kind, []).append(f"{info.key} ({why})" if "(" in why else info.key)
                continue
            usable.append(info)
            if digest not in handled:
                candidates.append((profile, info, infos))
        keys_by_profile[profile] = usable
    candidates.sort(key=lambda c: (c[1].last_modified, c[1].key))
    batch = candidates[:limit]
    if log is not None:
        for kind, count in sorted(skips.items()):
            shown = ", ".join(examples[kind][:LOG_EXAMPLES])
            more = f" and {count - LOG_EXAMPLES} more" if count > LOG_EXAMPLES else ""
            log.info(f"skipped {count} object(s), {kind}: {shown}{more}")
        if len(candidates) > limit:
            log.info(
                f"{len(candidates)} new input(s); taking {limit} this tick (sensors.max_new_per_tick), "
                f"{len(candidates) - limit} left for the next ticks"
            )
    # Partition keys: assigned over each profile's whole (usable) listing, as resolve_input does.
    keyed: dict[str, dict[str, str]] = {}
    out: list[tuple[str, ObjectInfo, str]] = []
    for profile, info, _ in batch:
        if profile not in keyed:
            mine = [k for k in existing if k.startswith(f"{profile}/")]
            keyed[profile] = assign_partition_keys(profile, keys_by_profile[profile], mine)
        out.append((profile, info, keyed[profile][info.key]))
    new_handled = (handled & listed) | {object_digest(info.key, info.etag) for _, info, _ in out}
    return out, new_handled, skips


def recorded_etags(store, batch: list[tuple[str, ObjectInfo, str]]) -> dict[str, str]:
    """``{partition: the input ETag its recording was made from}`` for the batch's partitions that
    have a recording: one listing of ``recordings/<profile>/`` per profile, then a read of only
    those records (re-uploads; brand-new inputs have none)."""
    out: dict[str, str] = {}
    for profile in sorted({p for p, _, _ in batch}):
        made = {info.key for info in store.list(f"{RECORDINGS}/{profile}/") if info.key.endswith("/" + RECORD_NAME)}
        for p, _, pk in batch:
            if p == profile and f"{RECORDINGS}/{pk}/{RECORD_NAME}" in made:
                record = read_record(store, pk)
                if record is not None:
                    out[pk] = clean_etag(record.input_etag)
    return out


def build_new_recordings_sensor(config: StemsetConfig) -> SensorDefinition:
    """The ``new_recordings`` sensor for ``config``'s profiles."""
    all_stems = stem_keys(config)
    selection = AssetSelection.assets(RECORDING_KEY, *all_stems)
    per_profile = {name: [RECORDING_KEY, *stem_keys(config, list(p.strategies))] for name, p in config.profiles.items()}

    @sensor(
        name=NEW_RECORDINGS,
        asset_selection=selection,
        minimum_interval_seconds=config.sensors.interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "New files under inputs/<profile>/: adds their `recordings` partitions and runs `recording` "
            "plus the profile's strategies, keyed by partition and content (ETag)."
        ),
    )
    def new_recordings(context: SensorEvaluationContext, media_store: MediaStoreResource):
        t0 = time.monotonic()
        store = media_store.get_store()
        existing = list(context.instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))  # once per tick
        known = set(existing)
        batch, handled, _ = scan_new_inputs(
            config, store, existing, decode_cursor(context.cursor), time.time(), context.log
        )
        new_keys = list(dict.fromkeys(pk for _, _, pk in batch if pk not in known))
        made_from = recorded_etags(store, batch)
        todo = [(p, info, pk) for p, info, pk in batch if made_from.get(pk) != clean_etag(info.etag)]
        # The spend guard: each input's estimate from its size (its length is not known yet).
        estimate = cost_model(config, None)

        def cost(item) -> float:
            profile, info, _ = item
            return len(config.profiles[profile].strategies) * estimate.cost_usd(
                audio_seconds_from_size(info.key, info.size)
            )

        admission = guard(context.instance, config, todo, cost)
        held = admission.describe(config.budget, "new input(s)")
        if held:  # not marked handled: looked at again next tick (or tomorrow)
            context.log.warning(held + "; they wait for the next tick")
            handled -= {object_digest(info.key, info.etag) for _, info, _ in admission.held}
        requests = [
            RunRequest(
                run_key=f"{pk}@{clean_etag(info.etag)}@{made_from.get(pk, 'new')}",
                partition_key=pk,
                asset_selection=per_profile[profile],
                tags={
                    "stemset/input_key": info.key,
                    "stemset/input_etag": clean_etag(info.etag),
                    "stemset/launched_by": NEW_RECORDINGS,
                    **(gpu_tags() if config.profiles[profile].strategies else {}),
                    **estimate_tag(cost((profile, info, pk))),
                },
            )
            for profile, info, pk in admission.admitted
        ]
        cursor = encode_cursor(handled)
        partitions_added = [recordings.build_add_request(new_keys)] if new_keys else []
        if not requests:
            return SensorResult(
                skip_reason=SkipReason(held or "no new inputs"),
                cursor=cursor,
                dynamic_partitions_requests=partitions_added,
            )
        context.log.info(
            f"{len(requests)} run(s) requested, {len(new_keys)} new partition(s), in {time.monotonic() - t0:.2f} s"
        )
        return SensorResult(run_requests=requests, dynamic_partitions_requests=partitions_added, cursor=cursor)

    return new_recordings


# --------------------------------------------------------------------------- stale stem sets


def auto_reprocess_name(strategy: str) -> str:
    return f"auto_reprocess_{strategy}"


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def select_for_reprocess(states, cap: int, per_partition_cost, spent: float, ceiling: float):
    """Stale or broken sets that can be redone (input present, or only the stems to redo), oldest
    stem set first, at most ``cap``, while ``spent`` + their estimated cost stays within ``ceiling``.
    Returns ``(chosen, spent, held_back)``. (Failed sets wait for a person: a rerun would likely fail again.)"""
    stale = [
        s
        for s in states
        if s.state in (STALE, BROKEN)
        and (s.input_present is not False or not any(r in NEEDS_RECORDING for r in s.reasons))
    ]
    stale.sort(key=lambda s: (s.materialized_at or 0.0, s.partition))
    chosen, held = [], 0
    for s in stale:
        if len(chosen) >= cap:
            break
        cost = per_partition_cost(s)
        if spent + cost > ceiling:
            held += 1
            continue
        spent += cost
        chosen.append((s, cost))
    return chosen, spent, held


def build_auto_reprocess_sensor(config: StemsetConfig, strategy: str) -> SensorDefinition:
    settings = config.sensors.auto_reprocess[strategy]
    stems = stem_keys(config, [strategy])

    @sensor(
        name=auto_reprocess_name(strategy),
        asset_selection=AssetSelection.assets(RECORDING_KEY, *stems),
        minimum_interval_seconds=config.sensors.interval_s,
        default_status=DefaultSensorStatus.RUNNING if settings.enabled else DefaultSensorStatus.STOPPED,
        description=(
            f"Rerun stale stem sets of {strategy!r}: at most {settings.max_per_tick} per tick and "
            f"${settings.daily_cost_ceiling_usd:g} estimated per day (sensors.auto_reprocess)."
        ),
    )
    def _auto(context: SensorEvaluationContext, media_store: MediaStoreResource):
        state = json.loads(context.cursor) if context.cursor else {}
        day = _today()
        spent = float(state.get("spent_usd", 0.0)) if state.get("day") == day else 0.0
        states = read_status(context.instance, config, [strategy], store=media_store.get_store())
        estimate = cost_model(config, history(states, strategy))
        chosen, spent, held = select_for_reprocess(
            states,
            settings.max_per_tick,
            lambda s: estimate.cost_usd(s.duration_s or 0.0),
            spent,
            settings.daily_cost_ceiling_usd,
        )
        admission = guard(context.instance, config, chosen, lambda item: item[1])
        over_budget = admission.describe(config.budget, "stale partition(s)")
        if over_budget:
            context.log.warning(over_budget)
            spent -= admission.held_usd
            chosen = admission.admitted
        cursor = json.dumps({"day": day, "spent_usd": round(spent, 6)})
        if held:
            context.log.warning(
                f"{held} stale partition(s) held back: the daily cost ceiling "
                f"${settings.daily_cost_ceiling_usd:g} would be passed (spent today ${spent:.4f})"
            )
        if not chosen:
            return SensorResult(
                skip_reason=SkipReason(
                    over_budget
                    or f"no stale stem sets of {strategy!r} to rerun" + (" within today's cost ceiling" if held else "")
                ),
                cursor=cursor,
            )
        requests = []
        for s, cost in chosen:
            selection = ([RECORDING_KEY] if set(NEEDS_RECORDING) & set(s.reasons) else []) + stems
            requests.append(
                RunRequest(
                    run_key=f"{s.partition}@{s.current_fingerprint}@{s.recording_sha256 or ''}@{s.reason}",
                    partition_key=s.partition,
                    asset_selection=selection,
                    tags={
                        "stemset/launched_by": auto_reprocess_name(strategy),
                        "stemset/reason": s.reason,
                        **estimate_tag(cost),
                        **gpu_tags(),
                    },
                )
            )
        context.log.info(
            f"{len(requests)} stale partition(s) of {strategy!r} requested "
            f"(estimated ${sum(c for _, c in chosen):.4f}; today ${spent:.4f})"
        )
        return SensorResult(run_requests=requests, cursor=cursor)

    return _auto


def build_sensors(config: StemsetConfig) -> list[SensorDefinition]:
    return [build_new_recordings_sensor(config)] + [
        build_auto_reprocess_sensor(config, name) for name in config.sensors.auto_reprocess
    ]

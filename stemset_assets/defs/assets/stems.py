"""The stem assets: one ``stems_<strategy>`` multi-asset per strategy in config.yaml.

Each has one :class:`~dagster.AssetSpec` per output stem (``stems/<strategy>/<stem>``), depends
on ``recording``, is partitioned by ``recordings`` and carries the strategy's fingerprint as
``code_version`` (so a strategy change shows the stems as changed in the UI). The set is made
as a whole: the separator resource runs one :class:`~gpu_worker.job.SeparationJob` per partition
that reads the canonical FLAC and publishes ``outputs/<profile>/<slug>/<strategy>/<stem>.<ext>``
plus ``manifest.json`` (last). A Dagster backfill groups up to ``backfill.max_partitions_per_run``
partitions per run (``BackfillPolicy.multi_run``); such a run sends all its jobs to the separator
at once (the model loads once; the modal backend fans them out with ``.map``).

A partition whose stored manifest was made from the same canonical FLAC (sha256) with the same
fingerprint, in the profile's output format, with every listed stem present, is reused: no
separation, metadata ``reused: true``. Anything else recomputes (and deletes files of the old
set that the new one did not overwrite, e.g. after an output format change). Either way the
checks (:mod:`stemset_assets.defs.checks`) are evaluated from the manifest as stored.

Each stem's metadata: ``uri``, ``url`` (playback), ``bytes``, ``duration_s``, ``lufs``,
``peak_dbfs``, ``suggested_gain_db`` (to -14 LUFS, peak kept under -1 dBFS), strategy,
fingerprint, ``input_sha256`` (the recording's data version), backend, device, GPU type,
``timings``, and for the whole set (one separation makes every stem): ``billed_seconds``,
``gpu_seconds``, ``cpu_core_seconds``, ``price_per_hour``, ``gpu_cost_usd``, ``cpu_cost_usd``,
``memory_cost_usd`` (each at its own price, ``prices_read`` the date of the list prices; local
runs at the configured local rates, default 0), ``cost_usd`` (their sum) and ``run_cost_usd``
(0 when reused).
Data version: a hash of the recording's sha256 and the fingerprint.
"""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at runtime.

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetCheckEvaluation,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    DagsterEventType,
    Failure,
    MetadataValue,
    multi_asset,
)

from gpu_worker.errors import StemsetError
from gpu_worker.job import SeparationJob, SeparationResult
from gpu_worker.manifests import read_manifest
from gpu_worker.stores.base import ObjectStore

from ...config import StemsetConfig
from ...core.layout import RecordingRecord, failure_key, manifest_key, read_record, stems_prefix
from ...core.partition_keys import split_partition_key
from ...core.set_facts import collect_states
from ...core.state import BROKEN, SetState, Target, reusable
from ...core.stemsets import data_version, model_repo, strategy_fingerprint, suggested_gain_db
from .. import checks
from ..asset_keys import RECORDING_KEY, stem_asset_key
from ..partitions import recordings
from ..resources.media_store import MediaStoreResource
from ..resources.separator import SeparatorResource

# Dagster's tags for an event's data version, code version and provenance
# (dagster._core.definitions.data_version, not exported publicly); tests/test_asset_definitions.py pins them
# to Dagster's own values.
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
CODE_VERSION_TAG = "dagster/code_version"
INPUT_DATA_VERSION_TAG = "dagster/input_data_version"
INPUT_EVENT_POINTER_TAG = "dagster/input_event_pointer"


def build_stems_asset(config: StemsetConfig, name: str, fp: str | None = None) -> AssetsDefinition:
    """The ``stems_<name>`` multi-asset for strategy ``name`` of ``config``."""
    strategy = config.strategy(name)
    repo = model_repo(config)
    fp = fp or strategy_fingerprint(strategy, repo)
    stems = strategy.stems
    models = ", ".join(strategy.models)
    specs = [
        AssetSpec(
            stem_asset_key(name, stem),
            deps=[RECORDING_KEY],
            description=f"The {stem!r} stem of strategy {name!r} ({models}), one file per recording.",
            code_version=fp,
            group_name=f"stems_{name}",
            kinds={"demucs"},
            metadata={"strategy": name, "fingerprint": fp, "models": models},
        )
        for stem in stems
    ]

    @multi_asset(
        name=f"stems_{name}",
        specs=specs,
        check_specs=checks.check_specs(name, stems, recordings),
        partitions_def=recordings,
        # The set is always made whole; subsetting only narrows what a run reports (and lets a
        # several-partition run report per partition instead of through required outputs).
        can_subset=True,
        backfill_policy=BackfillPolicy.multi_run(config.backfill.max_partitions_per_run),
        description=f"Separate a recording into {', '.join(stems)} with strategy {name!r} ({models}).",
        op_tags={"stemset/strategy": name},
    )
    def _stems(context: AssetExecutionContext, media_store: MediaStoreResource, separator: SeparatorResource):
        yield from materialize_stem_set(context, config, name, fp, media_store, separator)

    return _stems


# --------------------------------------------------------------------------- the run


def _job_id(run_id: str, pk: str, strategy: str) -> str:
    return f"{run_id}-{hashlib.sha256(f'{pk}:{strategy}'.encode()).hexdigest()[:8]}"


def set_state(store: ObjectStore, pk: str, name: str, fp: str, fmt: str) -> SetState:
    """The one rule's state of this partition's set, as this run would make it (so wanted)."""
    profile = pk.partition("/")[0]
    (pair,) = collect_states(store, [pk], [name], {(profile, name): Target(fp, fmt)}, {profile: frozenset({name})})
    return pair.state


def _record_failure(
    store: ObjectStore, pk: str, name: str, fp: str, record: RecordingRecord | None, error: str
) -> None:
    """``failure.json`` beside the set, so every reader of state sees ``failed`` with this error."""
    doc = {
        "fingerprint": fp,
        "input_sha256": record.source_sha256 if record else None,
        "error": error,
        "failed_at": time.time(),
    }
    try:
        store.put_bytes(failure_key(pk, name), json.dumps(doc).encode(), content_type="application/json")
    except StemsetError:
        pass  # the run fails with the separation's error either way; a store that refuses this says so there


@dataclass
class _Planned:
    """One partition of the run: its recording, the stored set, and the job if it must be made."""

    pk: str
    record: RecordingRecord
    old: SeparationResult | None
    reused: bool
    job: SeparationJob | None


def _plan(
    context: AssetExecutionContext,
    config: StemsetConfig,
    name: str,
    fp: str,
    store: ObjectStore,
    media_store: MediaStoreResource,
    separator: SeparatorResource,
    pk: str,
) -> _Planned:
    profile_name, _slug = split_partition_key(pk)
    strategy = config.strategy(name)
    profile = config.profiles.get(profile_name)
    if profile is None:
        raise Failure(
            description=(
                f"Partition {pk!r} belongs to profile {profile_name!r}, which config.yaml does "
                f"not define (profiles: {', '.join(config.profiles) or 'none'})."
            ),
            allow_retries=False,
        )
    record = read_record(store, pk)
    if record is None:
        raise Failure(
            description=(
                f"No canonical recording for partition {pk!r} (recordings/{pk}/recording.json "
                "is missing): materialise the `recording` asset for this partition first."
            ),
            allow_retries=False,
        )
    fmt, bitrate = profile.output.format, profile.output.bitrate
    prefix, mkey = stems_prefix(pk, name), manifest_key(pk, name)
    old = read_manifest(store, mkey)
    if old is not None and reusable(set_state(store, pk, name, fp, fmt)):
        context.log.info(f"{pk}: stems of {name!r} are current (fingerprint {fp}); reusing {store.uri(mkey)}")
        return _Planned(pk, record, old, True, None)
    job = SeparationJob(
        job_id=_job_id(context.run.run_id, pk, name),
        input_key=record.source_key,
        output_prefix=prefix,
        strategy_name=name,
        strategy=strategy.to_tree(),
        fingerprint=fp,
        storage=media_store.storage_ref(),
        output_format=fmt,
        bitrate_kbps=bitrate,
        aac_coder=profile.output.aac_coder if fmt == "m4a" else None,
        model_repo=model_repo(config),
        gpu_type=separator.gpu_type,
        metadata={"partition_key": pk, "recording_sha256": record.sha256, "run_id": context.run.run_id},
    )
    why = "no stem set yet" if old is None else "stored set is out of date"
    context.log.info(f"{pk}: separating with {name!r} on the {separator.backend} separator ({why})")
    return _Planned(pk, record, old, False, job)


def _stored_set(store: ObjectStore, plan: _Planned, name: str) -> SeparationResult:
    """The set as published, after removing files of the old set the new one did not overwrite."""
    mkey = manifest_key(plan.pk, name)
    stored = read_manifest(store, mkey)
    if stored is None:
        raise Failure(description=f"The separator finished but {store.uri(mkey)} is missing or unreadable.")
    if plan.old is not None and not plan.reused:
        for key in {f.key for f in plan.old.stems.values()} - {f.key for f in stored.stems.values()}:
            store.delete(key)
    if store.head(failure_key(plan.pk, name)) is not None:  # an earlier attempt's failure is history now
        store.delete(failure_key(plan.pk, name))
    return stored


def materialize_stem_set(
    context: AssetExecutionContext,
    config: StemsetConfig,
    name: str,
    fp: str,
    media_store: MediaStoreResource,
    separator: SeparatorResource,
) -> Iterator[AssetMaterialization | AssetCheckEvaluation]:
    """Make the run's partitions' stem sets, one partition or many (a backfill run) alike: their jobs
    go to the separator together (``separate_many``: the model loads once; Modal fans them out),
    and each partition gets its own materialisation, with the same data-version and provenance
    tags however the run was launched, and its own check evaluations. A failed partition gets
    ``failure.json`` beside its set; failures are listed in one Failure after the others are recorded."""
    store = media_store.get_store()
    keys = list(context.partition_keys)
    selected = set(context.selected_asset_keys)
    checked = {(k.asset_key, k.name) for k in context.selected_asset_check_keys}
    failed: dict[str, str] = {}
    plans: list[_Planned] = []
    for pk in keys:
        try:
            plans.append(_plan(context, config, name, fp, store, media_store, separator, pk))
        except Failure as err:
            failed[pk] = err.description or str(err)
    todo = [plan for plan in plans if plan.job is not None]
    context.log.info(
        f"{len(plans)} partition(s) of {name!r}: {len(todo)} to separate, {len(plans) - len(todo)} current"
    )
    try:
        outcomes = dict(
            zip((plan.pk for plan in todo), separator.separate_many([p.job for p in todo], store), strict=True)
        )
    except StemsetError as err:  # the separator itself is unusable (token, address, quota): no set is at fault
        raise Failure(description=f"separation with {name!r} could not start: {err}", allow_retries=False) from err
    pointers = context.instance.get_latest_storage_id_by_partition(
        RECORDING_KEY, DagsterEventType.ASSET_MATERIALIZATION, {plan.pk for plan in plans}
    )
    for plan in plans:
        outcome = outcomes.get(plan.pk)
        if isinstance(outcome, Exception):
            failed[plan.pk] = f"separation with {name!r} failed: {outcome}"
            _record_failure(store, plan.pk, name, fp, plan.record, str(outcome))
            continue
        try:
            stored = _stored_set(store, plan, name)
        except Failure as err:
            failed[plan.pk] = err.description or str(err)
            continue
        tags = provenance_tags(plan.record.sha256, fp, pointers.get(plan.pk))
        for key, metadata in _stem_events(config, name, fp, store, media_store, separator, plan, stored):
            if key in selected:
                yield AssetMaterialization(key, partition=plan.pk, metadata=metadata, tags=tags)
        state = set_state(store, plan.pk, name, fp, stored_format(stored))
        for result in checks.evaluate(
            name,
            config.strategy(name).stems,
            stored,
            mix_peak_dbfs=plan.record.peak_dbfs,
            incomplete=state.detail if state.state == BROKEN else None,
        ):
            if (result.asset_key, result.check_name) in checked:
                yield AssetCheckEvaluation(
                    asset_key=result.asset_key,
                    check_name=result.check_name,
                    passed=result.passed,
                    metadata=result.metadata,
                    severity=result.severity,
                    description=result.description,
                    partition=plan.pk,
                )
    if failed:
        if len(keys) == 1:
            (why,) = failed.values()
            raise Failure(description=f"{keys[0]}: {why}", allow_retries=False)
        lines = "\n".join(f"- {pk}: {why}" for pk, why in failed.items())
        raise Failure(description=f"{len(failed)} of {len(keys)} partition(s) failed:\n{lines}", allow_retries=False)


def provenance_tags(recording_sha256: str, fp: str, recording_storage_id: int | None) -> dict[str, str]:
    """The tags Dagster's staleness reads (what it writes itself for a one-partition run's outputs):
    this stem's data and code version, and which ``recording`` materialisation it was made from."""
    return {
        DATA_VERSION_TAG: data_version(recording_sha256, fp),
        DATA_VERSION_USER_PROVIDED_TAG: "true",
        CODE_VERSION_TAG: fp,
        f"{INPUT_DATA_VERSION_TAG}/{RECORDING_KEY.to_user_string()}": recording_sha256,
        f"{INPUT_EVENT_POINTER_TAG}/{RECORDING_KEY.to_user_string()}": (
            str(recording_storage_id) if recording_storage_id else "NULL"
        ),
    }


def stored_format(stored: SeparationResult) -> str:
    formats = {f.format for f in stored.stems.values()}
    return formats.pop() if len(formats) == 1 else ",".join(sorted(formats))


def _stem_events(
    config: StemsetConfig,
    name: str,
    fp: str,
    store: ObjectStore,
    media_store: MediaStoreResource,
    separator: SeparatorResource,
    plan: _Planned,
    stored: SeparationResult,
) -> Iterator[tuple[AssetKey, dict]]:
    """``(asset key, metadata)`` of every stem of a stored set."""
    record, pk, reused = plan.record, plan.pk, plan.reused
    mkey = manifest_key(pk, name)
    price = separator.price(stored)
    split = separator.cost(stored)
    cost = float(split["total_usd"])
    for stem in config.strategy(name).stems:
        f = stored.stems.get(stem)
        if f is None:
            raise Failure(description=f"{store.uri(mkey)} lists no stem {stem!r} (it has {', '.join(stored.stems)}).")
        yield (
            stem_asset_key(name, stem),
            {
                "uri": store.uri(f.key),
                "url": MetadataValue.url(media_store.playback_url(f.key)),
                "format": f.format,
                "bytes": int(f.bytes),
                "duration_s": round(float(f.duration_s), 3),
                "lufs": _num(f.lufs),
                "peak_dbfs": _num(f.peak_dbfs),
                "rms_dbfs": _num(f.rms_dbfs),
                "suggested_gain_db": suggested_gain_db(f.lufs, f.peak_dbfs),
                "nonfinite_samples": int(f.nonfinite_samples),
                "partition": pk,
                "strategy": name,
                "fingerprint": fp,
                "input_sha256": record.sha256,
                "source_sha256": stored.input_sha256,
                "backend": stored.backend,
                "device": stored.device,
                "gpu_type": stored.gpu_type or MetadataValue.null(),
                "timings": MetadataValue.json(stored.timings),
                "total_s": float(stored.timings.get("total", 0.0)),
                "billed_seconds": float(stored.billed_seconds),
                "gpu_seconds": float(split["gpu_seconds"]),
                "cpu_core_seconds": float(split["cpu_core_seconds"]),
                "price_per_hour": price,
                "gpu_price_per_hour": float(split["gpu_price_per_hour"]),
                "gpu_cost_usd": float(split["gpu_usd"]),
                "cpu_cost_usd": float(split["cpu_usd"]),
                "memory_cost_usd": float(split["memory_usd"]),
                "prices_read": str(split["prices_read"]),
                "cost_usd": cost,
                "run_cost_usd": 0.0 if reused else cost,
                "residual_db": _num(stored.residual_db),
                "reused": reused,
                "job_id": stored.job_id,
                "manifest": store.uri(mkey),
                "engine_version": stored.engine_version,
            },
        )


def _num(value: float | None):
    return MetadataValue.null() if value is None else round(float(value), 2)

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
``price_per_hour``, ``cost_usd`` (0 for local runs) and ``run_cost_usd`` (0 when reused).
Data version: a hash of the recording's sha256 and the fingerprint.
"""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at runtime.

import hashlib
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
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from gpu_worker.errors import StemsetError
from gpu_worker.job import SeparationJob, SeparationResult
from gpu_worker.stores.base import ObjectStore
from gpu_worker.worker import read_manifest

from ...config import StemsetConfig
from ...core.layout import RecordingRecord, manifest_key, read_record, stems_prefix
from ...core.partition_keys import split_partition_key
from ...core.stemsets import data_version, model_repo, strategy_fingerprint, suggested_gain_db
from .. import checks
from ..asset_keys import RECORDING_KEY, stem_asset_key
from ..partitions import recordings
from ..resources.media_store import MediaStoreResource
from ..resources.separator import SeparatorResource

# Dagster's tags for an event's data and code version (dagster._core.definitions.data_version, not
# exported publicly); tests/test_assets.py pins them to Dagster's own values.
DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"

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


def _reusable(store: ObjectStore, manifest: SeparationResult | None, record: RecordingRecord, fp: str,
              stems: list[str], fmt: str, prefix: str) -> bool:
    if manifest is None or manifest.fingerprint != fp or manifest.input_sha256 != record.source_sha256:
        return False
    if sorted(manifest.stems) != sorted(stems) or any(f.format != fmt for f in manifest.stems.values()):
        return False
    present = {info.key: info.size for info in store.list(prefix + "/")}  # one list, not a head per stem
    return all(present.get(f.key) == f.bytes for f in manifest.stems.values())


@dataclass
class _Planned:
    """One partition of the run: its recording, the stored set, and the job if it must be made."""

    pk: str
    record: RecordingRecord
    old: SeparationResult | None
    reused: bool
    job: SeparationJob | None


def _plan(context: AssetExecutionContext, config: StemsetConfig, name: str, fp: str, store: ObjectStore,
          media_store: MediaStoreResource, separator: SeparatorResource, pk: str) -> _Planned:
    profile_name, _slug = split_partition_key(pk)
    strategy = config.strategy(name)
    profile = config.profiles.get(profile_name)
    if profile is None:
        raise Failure(description=(f"Partition {pk!r} belongs to profile {profile_name!r}, which config.yaml does "
                                   f"not define (profiles: {', '.join(config.profiles) or 'none'})."),
                      allow_retries=False)
    record = read_record(store, pk)
    if record is None:
        raise Failure(description=(f"No canonical recording for partition {pk!r} (recordings/{pk}/recording.json "
                                   "is missing): materialise the `recording` asset for this partition first."),
                      allow_retries=False)
    fmt, bitrate = profile.output.format, profile.output.bitrate
    prefix, mkey = stems_prefix(pk, name), manifest_key(pk, name)
    old = read_manifest(store, mkey)
    if _reusable(store, old, record, fp, strategy.stems, fmt, prefix):
        context.log.info(f"{pk}: stems of {name!r} are current (fingerprint {fp}); reusing {store.uri(mkey)}")
        return _Planned(pk, record, old, True, None)
    job = SeparationJob(
        job_id=_job_id(context.run.run_id, pk, name), input_key=record.source_key, output_prefix=prefix,
        strategy_name=name, strategy=strategy.to_tree(), fingerprint=fp, storage=media_store.storage_ref(),
        output_format=fmt, bitrate_kbps=bitrate, model_repo=model_repo(config), gpu_type=separator.gpu_type,
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
    return stored


def materialize_stem_set(context: AssetExecutionContext, config: StemsetConfig, name: str, fp: str,
                         media_store: MediaStoreResource,
                         separator: SeparatorResource) -> Iterator[MaterializeResult | object]:
    """Make the run's partitions' stem sets. One partition: MaterializeResults (with their checks).
    Several (a backfill run): their jobs go to the separator together (``separate_many``: the model
    loads once; Modal fans them out), and each partition gets its own materialisation and check
    events; partitions that fail are listed in one Failure after the others are recorded."""
    store = media_store.get_store()
    keys = list(context.partition_keys)
    selected = set(context.selected_asset_keys)
    checked = {(k.asset_key, k.name) for k in context.selected_asset_check_keys}
    if len(keys) == 1:
        plan = _plan(context, config, name, fp, store, media_store, separator, keys[0])
        if plan.job is not None:
            try:
                separator.separate(plan.job, store)
            except StemsetError as err:
                raise Failure(description=f"{plan.pk}: separation with {name!r} failed: {err}",
                              allow_retries=False) from err
        stored = _stored_set(store, plan, name)
        for key, metadata, version in _stem_events(config, name, fp, store, media_store, separator, plan, stored):
            if key in selected:
                yield MaterializeResult(asset_key=key, data_version=version, metadata=metadata)
        yield from (r for r in checks.evaluate(name, config.strategy(name).stems, stored,
                                               mix_peak_dbfs=plan.record.peak_dbfs)
                    if (r.asset_key, r.check_name) in checked)
        return

    failed: dict[str, str] = {}
    plans: list[_Planned] = []
    for pk in keys:
        try:
            plans.append(_plan(context, config, name, fp, store, media_store, separator, pk))
        except Failure as err:
            failed[pk] = err.description or str(err)
    todo = [plan for plan in plans if plan.job is not None]
    context.log.info(f"{len(plans)} partition(s) of {name!r}: {len(todo)} to separate, "
                     f"{len(plans) - len(todo)} current")
    outcomes = dict(zip((plan.pk for plan in todo), separator.separate_many([p.job for p in todo], store), strict=True))
    for plan in plans:
        outcome = outcomes.get(plan.pk)
        if isinstance(outcome, Exception):
            failed[plan.pk] = f"separation with {name!r} failed: {outcome}"
            continue
        try:
            stored = _stored_set(store, plan, name)
        except Failure as err:
            failed[plan.pk] = err.description or str(err)
            continue
        for key, metadata, version in _stem_events(config, name, fp, store, media_store, separator, plan, stored):
            if key in selected:
                yield AssetMaterialization(key, partition=plan.pk, metadata=metadata,
                                           tags={DATA_VERSION_TAG: version.value, CODE_VERSION_TAG: fp})
        for result in checks.evaluate(name, config.strategy(name).stems, stored, mix_peak_dbfs=plan.record.peak_dbfs):
            if (result.asset_key, result.check_name) in checked:
                yield AssetCheckEvaluation(
                    asset_key=result.asset_key, check_name=result.check_name, passed=result.passed,
                    metadata=result.metadata, severity=result.severity, description=result.description,
                    partition=plan.pk)
    if failed:
        lines = "\n".join(f"- {pk}: {why}" for pk, why in failed.items())
        raise Failure(description=f"{len(failed)} of {len(keys)} partition(s) failed:\n{lines}", allow_retries=False)


def _stem_events(config: StemsetConfig, name: str, fp: str, store: ObjectStore, media_store: MediaStoreResource,
                 separator: SeparatorResource, plan: _Planned,
                 stored: SeparationResult) -> Iterator[tuple[AssetKey, dict, DataVersion]]:
    """``(asset key, metadata, data version)`` of every stem of a stored set."""
    record, pk, reused = plan.record, plan.pk, plan.reused
    mkey = manifest_key(pk, name)
    price = separator.price(stored)
    cost = separator.cost_usd(stored)
    version = DataVersion(data_version(record.sha256, fp))
    for stem in config.strategy(name).stems:
        f = stored.stems.get(stem)
        if f is None:
            raise Failure(description=f"{store.uri(mkey)} lists no stem {stem!r} (it has {', '.join(stored.stems)}).")
        yield stem_asset_key(name, stem), {
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
            "price_per_hour": price,
            "cost_usd": cost,
            "run_cost_usd": 0.0 if reused else cost,
            "residual_db": _num(stored.residual_db),
            "reused": reused,
            "job_id": stored.job_id,
            "manifest": store.uri(mkey),
            "engine_version": stored.engine_version,
        }, version


def _num(value: float | None):
    return MetadataValue.null() if value is None else round(float(value), 2)

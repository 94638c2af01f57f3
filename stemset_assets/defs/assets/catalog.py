"""The ``catalog`` asset: every recording x strategy, with its state, stems and cost.

:func:`build_catalog` reads the store with one paginated listing per area (``inputs/``,
``recordings/``, ``outputs/``) and one GET per ``recording.json`` and per ``manifest.json``;
no per-partition HEAD round trips. A row per recording (a partition of ``recordings``, or a
recording found in the store) and strategy (every strategy in config.yaml; ``default`` says
whether the recording's profile runs it on new inputs) with:

- ``state``: ``current`` / ``stale`` / ``missing`` (see :mod:`stemset_assets.core.stemsets`) and
  ``reason``;
- ``recording_state``: ``current``, ``input_changed`` (the input object's ETag differs from
  the one the recording was made from: re-materialise ``recording``), ``input_missing`` or
  ``not_materialised``;
- the stems' URIs (``stem_uris``: JSON ``{stem: uri}``), duration, the GPU (or CPU) seconds the
  worker billed and the cost in US$ (0 for local runs).

The asset writes ``catalog/catalog.csv`` and ``catalog/catalog.parquet`` (and
``catalog/cost_over_time.png``) to the store and shows a Markdown preview and totals.
"""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at runtime.

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, asset

from gpu_worker.errors import JobError
from gpu_worker.job import SeparationResult
from gpu_worker.stores.base import ObjectInfo, ObjectStore

from ...config import StemsetConfig
from ...core.cost import cost_usd, price_for
from ...core.layout import (
    CATALOG_COST_PLOT,
    CATALOG_CSV,
    CATALOG_PARQUET,
    INPUTS,
    OUTPUTS,
    RECORDINGS,
    RecordingRecord,
    manifest_key,
    parse_manifest_key,
    parse_record_key,
)
from ...core.partition_keys import split_partition_key
from ...core.plots import cost_over_time_png, inline_markdown_image
from ...core.stemsets import MISSING, fingerprints, set_state
from ..asset_keys import CATALOG_KEY, stem_keys
from ..partitions import RECORDINGS_PARTITIONS
from ..resources.media_store import MediaStoreResource

COLUMNS = [
    "partition", "profile", "strategy", "default", "state", "reason", "recording_state", "original_key",
    "input_sha256", "duration_s", "fingerprint", "manifest_fingerprint", "stems", "stem_uris", "format",
    "backend", "device", "gpu_type", "gpu_seconds", "cost_usd", "made_at", "manifest_uri",
]
PREVIEW_ROWS = 50
PREVIEW_COLUMNS = ["partition", "strategy", "state", "reason", "duration_s", "gpu_seconds", "cost_usd"]


def _records(store: ObjectStore) -> dict[str, RecordingRecord]:
    out: dict[str, RecordingRecord] = {}
    for info in store.list(f"{RECORDINGS}/"):
        pk = parse_record_key(info.key)
        if pk is None:
            continue
        try:
            out[pk] = RecordingRecord.from_dict(json.loads(store.get_bytes(info.key)))
        except (ValueError, TypeError):
            continue
    return out


def _manifests(store: ObjectStore) -> dict[tuple[str, str], tuple[SeparationResult, ObjectInfo]]:
    out: dict[tuple[str, str], tuple[SeparationResult, ObjectInfo]] = {}
    for info in store.list(f"{OUTPUTS}/"):
        parsed = parse_manifest_key(info.key)
        if parsed is None:
            continue
        try:
            out[parsed] = (SeparationResult.from_json(store.get_bytes(info.key)), info)
        except JobError:
            continue
    return out


def build_catalog(store: ObjectStore, config: StemsetConfig, partition_keys: Iterable[str] = (),
                  fps: dict[str, str] | None = None) -> pd.DataFrame:
    """The catalog as a DataFrame (columns :data:`COLUMNS`), one row per recording x strategy."""
    fps = fps if fps is not None else fingerprints(config)
    records = _records(store)
    manifests = _manifests(store)
    inputs = {info.key: info for info in store.list(f"{INPUTS}/")}
    keys = sorted(set(partition_keys) | set(records) | {pk for pk, _ in manifests})
    rows = []
    for pk in keys:
        try:
            profile, _ = split_partition_key(pk)
        except ValueError:
            continue
        record = records.get(pk)
        if record is None:
            recording_state = "not_materialised"
        elif record.original_key not in inputs:
            recording_state = "input_missing"
        elif inputs[record.original_key].etag != record.input_etag:
            recording_state = "input_changed"
        else:
            recording_state = "current"
        defaults = config.profiles[profile].strategies if profile in config.profiles else ()
        for name in config.strategies:
            found = manifests.get((pk, name))
            manifest, info = found if found else (None, None)
            state = set_state(manifest, record, fps[name])
            row = {
                "partition": pk, "profile": profile, "strategy": name, "default": name in defaults,
                "state": state.state, "reason": state.reason, "recording_state": recording_state,
                "original_key": record.original_key if record else None,
                "input_sha256": record.sha256 if record else None,
                "duration_s": round(record.frames / 44100, 3) if record else None,
                "fingerprint": fps[name], "manifest_fingerprint": None, "stems": None, "stem_uris": None,
                "format": None, "backend": None, "device": None, "gpu_type": None, "gpu_seconds": 0.0,
                "cost_usd": 0.0, "made_at": None, "manifest_uri": None,
            }
            if manifest is not None and info is not None:
                price = price_for(manifest, config.gpu)
                row.update({
                    "manifest_fingerprint": manifest.fingerprint,
                    "stems": ",".join(manifest.stems),
                    "stem_uris": json.dumps({s: store.uri(f.key) for s, f in manifest.stems.items()}),
                    "format": next(iter(manifest.stems.values())).format if manifest.stems else None,
                    "backend": manifest.backend, "device": manifest.device, "gpu_type": manifest.gpu_type,
                    "gpu_seconds": float(manifest.billed_seconds),
                    "cost_usd": cost_usd(manifest, price),
                    "made_at": pd.Timestamp(info.last_modified, unit="s", tz="UTC"),
                    "manifest_uri": store.uri(manifest_key(pk, name)),
                })
                if row["duration_s"] is None:
                    row["duration_s"] = round(float(manifest.input_duration_s), 3)
            rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["made_at"] = pd.to_datetime(df["made_at"], utc=True)
    return df


def totals(df: pd.DataFrame) -> dict[str, float | int]:
    """Recordings, audio hours, GPU hours and US$ over the catalog (each recording counted once)."""
    per_recording = df.drop_duplicates("partition")
    made = df[df["state"] != MISSING]
    return {
        "recordings": int(per_recording["partition"].nunique()),
        "audio_hours": round(float(per_recording["duration_s"].fillna(0).sum()) / 3600, 6),
        "stem_sets": int(len(made)),
        "gpu_hours": round(float(made["gpu_seconds"].sum()) / 3600, 6),
        "cost_usd": round(float(made["cost_usd"].sum()), 6),
        "current": int((df["state"] == "current").sum()),
        "stale": int((df["state"] == "stale").sum()),
        "missing": int((df["state"] == MISSING).sum()),
    }


def markdown_table(df: pd.DataFrame, columns: list[str] = PREVIEW_COLUMNS, rows: int = PREVIEW_ROWS) -> str:
    """A GitHub-style Markdown table of the first ``rows`` rows (no tabulate needed)."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return ""
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    head = df[columns].head(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in head.itertuples(index=False)]
    if len(df) > rows:
        lines.append(f"\n{len(df) - rows} more rows in the CSV / parquet.")
    return "\n".join(lines)


def save_catalog(store: ObjectStore, df: pd.DataFrame) -> None:
    """``catalog/catalog.csv`` and ``catalog/catalog.parquet`` in the store."""
    store.put_bytes(CATALOG_CSV, df.to_csv(index=False).encode("utf-8"), content_type="text/csv")
    with tempfile.TemporaryDirectory(prefix="stemset-catalog-") as tmp:
        path = Path(tmp) / "catalog.parquet"
        df.to_parquet(path, index=False)
        store.upload(path, CATALOG_PARQUET)


def build_catalog_asset(config: StemsetConfig, fps: dict[str, str] | None = None) -> AssetsDefinition:
    fps = fps if fps is not None else fingerprints(config)

    @asset(
        name=CATALOG_KEY.path[-1],
        deps=stem_keys(config),
        group_name="catalog",
        kinds={"pandas", "parquet"},
        description=("Every recording x strategy: state (current / stale / missing), stems, duration, GPU "
                     "seconds and cost; saved as catalog/catalog.csv and catalog/catalog.parquet."),
    )
    def catalog(context: AssetExecutionContext, media_store: MediaStoreResource) -> MaterializeResult:
        store = media_store.get_store()
        partition_keys = context.instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
        df = build_catalog(store, config, partition_keys, fps)
        save_catalog(store, df)
        sums = totals(df)
        metadata = {
            "preview": MetadataValue.md(markdown_table(df)),
            "dagster/row_count": len(df),
            **{k: v for k, v in sums.items()},
            "csv": store.uri(CATALOG_CSV),
            "parquet": store.uri(CATALOG_PARQUET),
            "csv_url": MetadataValue.url(media_store.playback_url(CATALOG_CSV)),
        }
        made = df[df["state"] != MISSING]
        if len(made):
            png = cost_over_time_png([t.timestamp() for t in made["made_at"]], list(made["cost_usd"]),
                                     list(made["gpu_seconds"]))
            store.put_bytes(CATALOG_COST_PLOT, png, content_type="image/png")
            metadata["cost_over_time"] = MetadataValue.md(inline_markdown_image(png, "cost over time"))
            metadata["cost_over_time_url"] = MetadataValue.url(media_store.playback_url(CATALOG_COST_PLOT))
        context.log.info(f"catalog: {sums}")
        return MaterializeResult(metadata=metadata)

    return catalog

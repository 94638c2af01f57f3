"""The catalog table: every recording x strategy with its state, stems and cost, from the one
state rule's rows (:mod:`stemset_assets.core.status`); its totals, a Markdown preview, and where
it is saved (``catalog/catalog.csv``, ``catalog/catalog.parquet``).

Shared by the ``catalog`` asset, ``stemset catalog`` and the web API. This module imports no Dagster.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from .layout import CATALOG_CSV, CATALOG_PARQUET, manifest_key
from .set_facts import FactCache
from .state import BROKEN, INPUT_CHANGED, INPUT_MISSING, MISSING, NOT_RECORDED, STALE, UNUSED
from .status import SetStatus, status_rows

COLUMNS = [
    "partition",
    "profile",
    "strategy",
    "default",
    "state",
    "reason",
    "detail",
    "recording_state",
    "original_key",
    "duration_s",
    "fingerprint",
    "manifest_fingerprint",
    "stems",
    "stem_uris",
    "stem_keys",
    "format",
    "backend",
    "gpu_type",
    "gpu_seconds",
    "cost_usd",
    "made_at",
    "manifest_uri",
]
PREVIEW_ROWS = 50
PREVIEW_COLUMNS = ["partition", "strategy", "state", "reason", "duration_s", "gpu_seconds", "cost_usd"]
PLAYABLE_STATES = frozenset({"current", STALE, "failed", UNUSED})
"""States whose stored set (if any) is whole: its stems can be played."""


def recording_state(row: SetStatus) -> str:
    reasons = set(row.reasons)
    if NOT_RECORDED in reasons:
        return "not_materialised"
    if INPUT_MISSING in reasons:
        return "input_missing"
    if INPUT_CHANGED in reasons:
        return "input_changed"
    return "current"


def catalog_frame(store: ObjectStore, rows: Iterable[SetStatus]) -> pd.DataFrame:
    """The catalog as a DataFrame (columns :data:`COLUMNS`), one row per recording x strategy."""
    out = []
    for r in rows:
        whole = r.state in PLAYABLE_STATES and bool(r.stems)
        out.append(
            {
                "partition": r.partition,
                "profile": r.profile,
                "strategy": r.strategy,
                "default": r.default,
                "state": r.state,
                "reason": r.reason,
                "detail": r.detail,
                "recording_state": recording_state(r),
                "original_key": r.original_key,
                "duration_s": None if r.duration_s is None else round(r.duration_s, 3),
                "fingerprint": r.current_fingerprint,
                "manifest_fingerprint": r.fingerprint,
                "stems": ",".join(r.stems) if r.stems else None,
                "stem_uris": json.dumps({s: store.uri(k) for s, k in r.stems.items()}) if whole else None,
                "stem_keys": json.dumps(r.stems) if whole else None,
                "format": r.format,
                "backend": r.backend,
                "gpu_type": r.gpu_type,
                "gpu_seconds": float(r.billed_seconds or 0.0),
                "cost_usd": float(r.cost_usd or 0.0),
                "made_at": None if r.materialized_at is None else pd.Timestamp(r.materialized_at, unit="s", tz="UTC"),
                "manifest_uri": store.uri(manifest_key(r.partition, r.strategy)) if r.fingerprint else None,
            }
        )
    df = pd.DataFrame(out, columns=COLUMNS)
    df["made_at"] = pd.to_datetime(df["made_at"], utc=True)
    return df


def build_catalog(
    store: ObjectStore, config: StemsetConfig, partition_keys: Iterable[str], cache: FactCache | None = None
) -> pd.DataFrame:
    """:func:`catalog_frame` of the states of ``partition_keys`` x every strategy in ``config``."""
    return catalog_frame(store, status_rows(store, config, sorted(set(partition_keys)), cache=cache))


def totals(df: pd.DataFrame) -> dict[str, float | int]:
    """Recordings, audio hours, GPU hours, US$ and sets per state (each recording counted once)."""
    per_recording = df.drop_duplicates("partition")
    made = df[df["manifest_fingerprint"].notna()]
    return {
        "recordings": int(per_recording["partition"].nunique()),
        "audio_hours": round(float(per_recording["duration_s"].fillna(0).sum()) / 3600, 6),
        "stem_sets": int(len(made)),
        "gpu_hours": round(float(made["gpu_seconds"].sum()) / 3600, 6),
        "cost_usd": round(float(made["cost_usd"].sum()), 6),
        **{state: int((df["state"] == state).sum()) for state in ("current", STALE, MISSING, "failed", BROKEN, UNUSED)},
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

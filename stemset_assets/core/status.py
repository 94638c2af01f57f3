"""The status of every stem set in the config's terms: what ``stemset status``, the catalog, the
backfill plan, the sensors and the web API all read.

:func:`status_rows` turns the config into the rule's targets (each strategy's fingerprint, each
profile's output format and strategies), reads the facts from the store
(:func:`~stemset_assets.core.set_facts.collect_states`) and returns one :class:`SetStatus` per
recording x strategy, with the state and reasons of :func:`~stemset_assets.core.state.decide_state`
and what the stored set recorded (fingerprint, backend, billed seconds, cost).

This module imports no Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import pandas as pd

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from .cost import total_cost_usd
from .selection import check_profile, check_strategies
from .set_facts import FactCache, PairFacts, collect_states, paused_gc
from .state import STATES, Target
from .stemsets import fingerprints

COLUMNS = [
    "partition",
    "profile",
    "strategy",
    "state",
    "reason",
    "detail",
    "default",
    "duration_s",
    "input_present",
    "original_key",
    "fingerprint",
    "current_fingerprint",
    "input_sha256",
    "recording_sha256",
    "format",
    "backend",
    "gpu_type",
    "billed_seconds",
    "cost_usd",
    "materialized_at",
]


@dataclass(frozen=True)
class SetStatus:
    """One recording x strategy."""

    partition: str
    profile: str
    strategy: str
    state: str  # one of core.state.STATES
    reason: str  # ";"-joined reason tokens of core.state
    detail: str
    default: bool  # the recording's profile runs the strategy
    duration_s: float | None  # audio seconds (None when neither the recording nor a set says)
    input_present: bool | None  # None when the recording was never made (its input is not matched)
    original_key: str | None = None
    fingerprint: str | None = None  # of the stored set
    current_fingerprint: str = ""
    input_sha256: str | None = None  # the canonical FLAC the stored set was made from
    recording_sha256: str | None = None  # the canonical FLAC now
    format: str | None = None
    backend: str | None = None
    gpu_type: str | None = None
    billed_seconds: float | None = None
    cost_usd: float | None = None
    materialized_at: float | None = None
    stems: dict[str, str] = field(default_factory=dict)  # stem name -> object key

    @property
    def reasons(self) -> list[str]:
        return self.reason.split(";") if self.reason else []


@dataclass
class StrategyHistory:
    """What the stored sets of one strategy recorded, for cost estimates."""

    runs: int = 0
    audio_seconds: float = 0.0
    billed_seconds: float = 0.0
    by_backend: dict[str, tuple[float, float]] = field(default_factory=dict)  # backend -> (audio s, billed s)

    def billed_per_audio_second(self, backend: str) -> float | None:
        audio, billed = self.by_backend.get(backend, (0.0, 0.0))
        return billed / audio if audio > 0 and billed > 0 else None


def targets(config: StemsetConfig) -> tuple[dict[tuple[str, str], Target], dict[str, frozenset[str]]]:
    """What each (profile, strategy) asks for now, and each profile's strategies."""
    fps = fingerprints(config)
    goal = {
        (p, s): Target(fps[s], profile.output.format)
        for p, profile in config.profiles.items()
        for s in config.strategies
    }
    wanted = {p: frozenset(profile.strategies) for p, profile in config.profiles.items()}
    return goal, wanted


def status_rows(
    store: ObjectStore,
    config: StemsetConfig,
    partitions: Sequence[str],
    strategies: Sequence[str] | None = None,
    profile: str | None = None,
    cache: FactCache | None = None,
    *,
    also_wanted: Sequence[str] = (),
) -> list[SetStatus]:
    """One :class:`SetStatus` per partition (optionally of one profile) x strategy (default: all).
    ``also_wanted``: strategies asked for explicitly (``stemset process --strategy``), judged as if
    every profile listed them rather than ``unused``."""
    names = check_strategies(config, strategies)
    check_profile(config, profile)
    keys = [pk for pk in partitions if "/" in pk and (profile is None or pk.startswith(f"{profile}/"))]
    goal, wanted = targets(config)
    if also_wanted:
        wanted = {p: w | frozenset(also_wanted) for p, w in wanted.items()}
    fps = fingerprints(config)
    costs: dict[tuple, float] = {}  # a set's cost depends on these three facts alone: price each once
    with paused_gc():
        pairs = collect_states(store, keys, names, goal, wanted, cache)
        return [_row(config, pair, fps[pair.strategy], costs) for pair in pairs]


def _row(config: StemsetConfig, pair: PairFacts, current_fp: str, costs: dict[tuple, float]) -> SetStatus:
    facts, manifest, rec = pair.facts, pair.facts.manifest, pair.facts.recording
    profile = pair.partition.partition("/")[0]
    duration = (
        rec.duration_s
        if rec is not None and rec.duration_s is not None
        else (manifest.duration_s if manifest is not None else None)
    )
    cost = None
    if manifest is not None:
        doc = {"backend": manifest.backend, "billed_seconds": manifest.billed_seconds, "gpu_type": manifest.gpu_type}
        cost = costs.get(memo := tuple(doc.values()))
        if cost is None:
            cost = costs[memo] = total_cost_usd(doc, config)
    return SetStatus(
        partition=pair.partition,
        profile=profile,
        strategy=pair.strategy,
        state=pair.state.state,
        reason=pair.state.reason,
        detail=pair.state.detail,
        default=facts.wanted,
        duration_s=duration,
        input_present=None if rec is None else facts.input_etag is not None,
        original_key=rec.original_key if rec is not None else None,
        fingerprint=manifest.fingerprint if manifest else None,
        current_fingerprint=current_fp,
        input_sha256=manifest.input_sha256 if manifest else None,
        recording_sha256=rec.source_sha256 if rec is not None else None,
        format=manifest.output_format if manifest else None,
        backend=manifest.backend if manifest else None,
        gpu_type=manifest.gpu_type if manifest else None,
        billed_seconds=manifest.billed_seconds if manifest else None,
        cost_usd=cost,
        materialized_at=manifest.made_at if manifest else None,
        stems={name: key for name, (key, _) in manifest.stems.items()} if manifest else {},
    )


def history(rows: Sequence[SetStatus], strategy: str) -> StrategyHistory:
    """Billed seconds per audio second by backend, over the strategy's stored sets."""
    out = StrategyHistory()
    for row in rows:
        if row.strategy != strategy or not row.billed_seconds or not row.duration_s or row.fingerprint is None:
            continue
        out.runs += 1
        out.audio_seconds += row.duration_s
        out.billed_seconds += row.billed_seconds
        backend = row.backend or "local"
        audio, billed = out.by_backend.get(backend, (0.0, 0.0))
        out.by_backend[backend] = (audio + row.duration_s, billed + row.billed_seconds)
    return out


def status_frame(rows: Sequence[SetStatus]) -> pd.DataFrame:
    """The rows as a DataFrame (columns :data:`COLUMNS`)."""
    return columns_frame(status_columns(rows))


def status_columns(rows: Sequence[SetStatus]) -> dict[str, list]:
    """The rows' :data:`COLUMNS`, column by column (what a kept status stores)."""
    with paused_gc():
        records = list(map(attrgetter(*COLUMNS), rows))
        if not records:
            return {c: [] for c in COLUMNS}
        return {c: list(values) for c, values in zip(COLUMNS, zip(*records, strict=True), strict=True)}


def columns_frame(columns: dict[str, list]) -> pd.DataFrame:
    """The DataFrame of :func:`status_columns`' columns (or columns kept and merged)."""
    with paused_gc():
        return pd.DataFrame(columns, columns=COLUMNS)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Counts per profile x strategy of every state, total, audio hours and inputs missing."""
    cols = ["profile", "strategy", *STATES, "total", "audio_hours", "inputs_missing"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (prof, name), group in df.groupby(["profile", "strategy"], sort=True):
        counts = group["state"].value_counts()
        rows.append(
            {
                "profile": prof,
                "strategy": name,
                **{s: int(counts.get(s, 0)) for s in STATES},
                "total": len(group),
                "audio_hours": round(float(group["duration_s"].fillna(0).sum()) / 3600, 3),
                "inputs_missing": int((group["input_present"] == False).sum()),  # noqa: E712 - None is not False
            }
        )
    return pd.DataFrame(rows, columns=cols)

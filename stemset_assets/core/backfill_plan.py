"""Backfill planning without Dagster: which of a strategy's stem sets to redo, and what it costs.

:func:`check_request` checks the strategy, mode and profile; :func:`plan_from_states` picks the
partitions from their states (by default every set that is not current: stale, missing, broken
or failed; or one of those states; or all) and estimates audio hours and cost:
audio seconds x billed seconds per audio second (recorded on this GPU backend by the strategy's
latest materialisations, else ``backfill.billed_seconds_per_audio_second``) x the configured
GPU's price per hour (0 for the local backend, whose runs cost nothing).

The states come from :func:`stemset_assets.core.status.status_rows` (the one state rule);
:mod:`stemset_assets.defs.backfill` reads them and launches the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_worker.errors import StemsetError

from ..config import StemsetConfig
from .cost import price_per_held_hour
from .selection import check_profile, check_strategies
from .spend_guard import Admission, Spending, admit
from .state import BROKEN, CURRENT, FAILED, INPUT_CHANGED, MISSING, NOT_RECORDED, STALE, TO_REDO
from .status import SetStatus, StrategyHistory

MODE_STATES = {
    "redo": tuple(sorted(TO_REDO)),
    "stale": (STALE,),
    "missing": (MISSING,),
    "broken": (BROKEN,),
    "failed": (FAILED,),
    "all": (*sorted(TO_REDO), CURRENT),
}
MODES = tuple(MODE_STATES)
NEEDS_RECORDING = (INPUT_CHANGED, NOT_RECORDED)
"""Reasons that need the ``recording`` asset materialised again before the stems."""


@dataclass(frozen=True)
class CostModel:
    backend: str
    gpu_type: str | None
    price_per_hour: float
    billed_per_audio_second: float
    source: str  # "recorded (N runs)" or "config default"

    def billed_seconds(self, audio_seconds: float) -> float:
        return audio_seconds * self.billed_per_audio_second

    def cost_usd(self, audio_seconds: float) -> float:
        return round(self.billed_seconds(audio_seconds) * self.price_per_hour / 3600.0, 6)


def cost_model(config: StemsetConfig, history: StrategyHistory | None) -> CostModel:
    backend = config.gpu.backend
    price = price_per_held_hour(config, backend)  # GPU + reserved CPU and memory; local: the local rate
    recorded = history.billed_per_audio_second(backend) if history is not None else None
    if recorded is not None:
        return CostModel(
            backend,
            None if backend == "local" else config.gpu.type,
            price,
            recorded,
            f"recorded on the {backend} backend",
        )
    return CostModel(
        backend,
        None if backend == "local" else config.gpu.type,
        price,
        config.backfill.billed_seconds_per_audio_second,
        "config default (backfill.billed_seconds_per_audio_second)",
    )


@dataclass
class BackfillPlan:
    strategy: str
    mode: str
    profile: str | None
    partitions: list[str]
    audio_seconds: float
    estimate: CostModel
    include_recording: bool
    skipped: dict[str, str] = field(default_factory=dict)  # partition -> why it is left out
    unknown_duration: int = 0
    durations: dict[str, float | None] = field(default_factory=dict, repr=False)  # partition -> audio s
    held_back: list[str] = field(default_factory=list)  # partitions the GPU budget left out
    budget_note: str = ""  # what the spend guard held back and why ("" when nothing)
    budget: dict[str, Any] = field(default_factory=dict)  # the spend guard's numbers

    @property
    def count(self) -> int:
        return len(self.partitions)

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600.0

    @property
    def billed_seconds(self) -> float:
        return self.estimate.billed_seconds(self.audio_seconds)

    @property
    def cost_usd(self) -> float:
        return self.estimate.cost_usd(self.audio_seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "mode": self.mode,
            "profile": self.profile,
            "count": self.count,
            "audio_hours": round(self.audio_hours, 4),
            "billed_seconds": round(self.billed_seconds, 2),
            "estimated_cost_usd": round(self.cost_usd, 4),
            "backend": self.estimate.backend,
            "gpu_type": self.estimate.gpu_type,
            "price_per_hour": self.estimate.price_per_hour,
            "billed_per_audio_second": round(self.estimate.billed_per_audio_second, 4),
            "estimate_source": self.estimate.source,
            "include_recording": self.include_recording,
            "partitions": self.partitions,
            "skipped": self.skipped,
            "unknown_duration": self.unknown_duration,
            "held_back": self.held_back,
            "held_back_reason": self.budget_note or None,
            "budget": self.budget or None,
        }

    def describe(self) -> str:
        where = f" of profile {self.profile}" if self.profile else ""
        cost = (
            "$0.00 (local backend: runs in this machine)"
            if self.estimate.backend == "local"
            else f"${self.cost_usd:.2f} on {self.estimate.gpu_type} at ${self.estimate.price_per_hour:.2f}/h"
        )
        lines = [
            f"{self.count} {self.mode if self.mode not in ('all', 'redo') else ''} partition(s){where} for strategy {self.strategy!r}".replace(
                "  ", " "
            ),
            f"  audio: {self.audio_hours:.3f} h ({self.audio_seconds:.0f} s)"
            + (f"; {self.unknown_duration} without a known duration" if self.unknown_duration else ""),
            f"  estimated compute: {self.billed_seconds / 3600:.3f} h "
            f"({self.estimate.billed_per_audio_second:.3f} s per audio s, {self.estimate.source})",
            f"  estimated cost: {cost}",
        ]
        if self.skipped:
            lines.append(
                f"  left out: {len(self.skipped)} ("
                + ", ".join(f"{pk}: {why}" for pk, why in list(self.skipped.items())[:5])
                + (", ..." if len(self.skipped) > 5 else "")
                + ")"
            )
        if self.budget_note:
            lines.append(f"  {self.budget_note}")
        return "\n".join(lines)

    def partition_cost(self, partition: str) -> float:
        return self.estimate.cost_usd(self.durations.get(partition) or 0.0)


def within_budget(plan: BackfillPlan, config: StemsetConfig, spending: Spending) -> BackfillPlan:
    """``plan`` cut to the partitions whose estimates fit the GPU budget after ``spending`` (in
    plan order); the rest are listed in ``held_back`` and ``budget_note`` says why."""
    admission: Admission[str] = admit(plan.partitions, plan.partition_cost, config.budget, spending)
    return with_admission(plan, config, admission)


def with_admission(plan: BackfillPlan, config: StemsetConfig, admission: Admission[str]) -> BackfillPlan:
    kept = list(admission.admitted)
    seconds = sum(plan.durations.get(pk) or 0.0 for pk in kept)
    unknown = sum(1 for pk in kept if plan.durations.get(pk) is None)
    return BackfillPlan(
        plan.strategy,
        plan.mode,
        plan.profile,
        kept,
        seconds,
        plan.estimate,
        plan.include_recording,
        plan.skipped,
        unknown,
        plan.durations,
        list(admission.held),
        admission.describe(config.budget, "partition(s)"),
        admission.as_dict() if config.budget.limited else {},
    )


def check_request(config: StemsetConfig, strategy: str, mode: str, profile: str | None) -> str:
    """The strategy's name once the strategy, ``mode`` and ``profile`` are known to be valid."""
    (strategy,) = check_strategies(config, [strategy])
    check_profile(config, profile)
    if mode not in MODES:
        raise StemsetError(f"Unknown backfill mode {mode!r}.", f"Use one of: {', '.join(MODES)}.")
    return strategy


def plan_from_states(
    config: StemsetConfig,
    strategy: str,
    mode: str,
    profile: str | None,
    states: Sequence[SetStatus],
    history: StrategyHistory | None,
) -> BackfillPlan:
    """The partitions of ``strategy`` in ``states`` to redo (``mode``: one of :data:`MODES`; unused
    sets are never chosen) and their estimate from ``history`` (None: the config default)."""
    wanted = MODE_STATES[mode]
    chosen: list[str] = []
    durations: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    seconds, unknown, recording = 0.0, 0, False
    for s in states:
        if s.strategy != strategy or s.state not in wanted:
            continue
        needs_recording = any(r in NEEDS_RECORDING for r in s.reasons)
        if s.input_present is False and (needs_recording or s.duration_s is None):
            skipped[s.partition] = "input missing and no canonical recording to separate"
            continue
        chosen.append(s.partition)
        durations[s.partition] = s.duration_s
        recording = recording or needs_recording
        if s.duration_s is None:
            unknown += 1
        else:
            seconds += s.duration_s
    return BackfillPlan(
        strategy, mode, profile, chosen, seconds, cost_model(config, history), recording, skipped, unknown, durations
    )

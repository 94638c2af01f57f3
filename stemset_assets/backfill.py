"""Backfills of one strategy's stem sets: which partitions, what they cost, and launching them.

:func:`plan_backfill` picks the partitions from :func:`~stemset_assets.staleness.partition_states`
(``stale``, ``missing`` or all) and estimates audio hours and cost: audio seconds x billed
seconds per audio second (recorded on this GPU backend by the strategy's latest materialisations,
else ``backfill.billed_seconds_per_audio_second``) x the configured GPU's price per hour (0 for
the local backend, whose runs cost nothing).

:func:`launch_backfill` starts a real Dagster backfill: through the webserver's GraphQL
(``launchPartitionBackfill``; the daemon then groups partitions into runs by the stem assets'
backfill policy) when a webserver URL is configured and answers, otherwise in this process
(:func:`stemset_assets.runs.materialize_in_process`) with a progress callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import StemsetError

from .staleness import INPUT_CHANGED, NOT_RECORDED, StrategyHistory, check_profile, check_strategies, partition_states
from .stemsets import MISSING, STALE

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from gpu_worker.stores.base import ObjectStore

    from .config import StemsetConfig
    from .runs import RunOutcome
    from .staleness import PartitionState

MODES = ("stale", "missing", "all")
NEEDS_RECORDING = (INPUT_CHANGED, NOT_RECORDED)


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


def cost_model(config: "StemsetConfig", history: StrategyHistory | None) -> CostModel:
    backend = config.gpu.backend
    price = 0.0 if backend == "local" else config.gpu.price_per_hour()
    recorded = history.billed_per_audio_second(backend) if history is not None else None
    if recorded is not None:
        return CostModel(backend, None if backend == "local" else config.gpu.type, price, recorded,
                         f"recorded on the {backend} backend")
    return CostModel(backend, None if backend == "local" else config.gpu.type, price,
                     config.backfill.billed_seconds_per_audio_second, "config default (backfill.billed_seconds_per_audio_second)")


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
            "strategy": self.strategy, "mode": self.mode, "profile": self.profile, "count": self.count,
            "audio_hours": round(self.audio_hours, 4), "billed_seconds": round(self.billed_seconds, 2),
            "estimated_cost_usd": round(self.cost_usd, 4), "backend": self.estimate.backend,
            "gpu_type": self.estimate.gpu_type, "price_per_hour": self.estimate.price_per_hour,
            "billed_per_audio_second": round(self.estimate.billed_per_audio_second, 4),
            "estimate_source": self.estimate.source, "include_recording": self.include_recording,
            "partitions": self.partitions, "skipped": self.skipped, "unknown_duration": self.unknown_duration,
        }

    def describe(self) -> str:
        where = f" of profile {self.profile}" if self.profile else ""
        cost = ("$0.00 (local backend: runs in this machine)" if self.estimate.backend == "local"
                else f"${self.cost_usd:.2f} on {self.estimate.gpu_type} at ${self.estimate.price_per_hour:.2f}/h")
        lines = [
            f"{self.count} {self.mode if self.mode != 'all' else ''} partition(s){where} for strategy {self.strategy!r}"
            .replace("  ", " "),
            f"  audio: {self.audio_hours:.3f} h ({self.audio_seconds:.0f} s)"
            + (f"; {self.unknown_duration} without a known duration" if self.unknown_duration else ""),
            f"  estimated compute: {self.billed_seconds / 3600:.3f} h "
            f"({self.estimate.billed_per_audio_second:.3f} s per audio s, {self.estimate.source})",
            f"  estimated cost: {cost}",
        ]
        if self.skipped:
            lines.append(f"  left out: {len(self.skipped)} (" + ", ".join(
                f"{pk}: {why}" for pk, why in list(self.skipped.items())[:5]) + (", ..." if len(self.skipped) > 5 else "") + ")")
        return "\n".join(lines)


def plan_backfill(instance: "DagsterInstance", config: "StemsetConfig", strategy: str, mode: str = "stale",
                  profile: str | None = None, *, store: "ObjectStore | None" = None,
                  states: "Sequence[PartitionState] | None" = None) -> BackfillPlan:
    """The partitions of ``strategy`` to redo (``mode``: stale | missing | all) and their estimate."""
    (strategy,) = check_strategies(config, [strategy])
    check_profile(config, profile)
    if mode not in MODES:
        raise StemsetError(f"Unknown backfill mode {mode!r}.", f"Use one of: {', '.join(MODES)}.")
    history: dict[str, StrategyHistory] = {}
    if states is None:
        states = partition_states(instance, config, [strategy], profile, store=store, history=history)
    wanted = {"stale": (STALE,), "missing": (MISSING,), "all": (STALE, MISSING, "current")}[mode]
    chosen: list[str] = []
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
        recording = recording or needs_recording
        if s.duration_s is None:
            unknown += 1
        else:
            seconds += s.duration_s
    return BackfillPlan(strategy, mode, profile, chosen, seconds, cost_model(config, history.get(strategy)),
                        recording, skipped, unknown)


def webserver_url(config: "StemsetConfig", override: str | None = None) -> str | None:
    if override:
        return override
    dagster = getattr(config, "dagster", None)
    return getattr(dagster, "webserver_url", None)


@dataclass
class LaunchResult:
    path: str  # "webserver" | "in_process" | "nothing"
    backfill_id: str | None = None
    outcomes: "list[RunOutcome]" = field(default_factory=list)
    message: str = ""

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.success)


def launch_backfill(plan: BackfillPlan, config: "StemsetConfig", instance: "DagsterInstance", *,
                    url: str | None = None, resources: dict | None = None,
                    progress: Callable[[int, int, "RunOutcome"], None] | None = None,
                    say: Callable[[str], None] = print) -> LaunchResult:
    """Launch ``plan``: a partition backfill through the webserver when ``url`` (or the config's
    ``dagster.webserver_url``) answers, else in-process runs."""
    from .runs import WebserverClient, materialize_in_process, selection_for

    if not plan.partitions:
        return LaunchResult("nothing", message="nothing to do")
    url = webserver_url(config, url)
    if url:
        client = WebserverClient(url)
        if client.reachable():
            assets = selection_for(config, [plan.strategy], plan.include_recording)
            backfill_id = client.launch_partition_backfill(
                plan.partitions, assets, title=f"stemset backfill {plan.strategy} --{plan.mode}")
            return LaunchResult("webserver", backfill_id=backfill_id,
                                message=f"backfill {backfill_id} launched on {url}: {url}/overview/backfills/{backfill_id}")
        say(f"The Dagster webserver at {url} is not reachable; running the backfill in this process instead.")
    outcomes = materialize_in_process(config, instance, plan.partitions, [plan.strategy],
                                      include_recording=plan.include_recording, resources=resources,
                                      progress=progress, tags={"stemset/backfill": f"{plan.strategy}:{plan.mode}"})
    ok = sum(1 for o in outcomes if o.success)
    return LaunchResult("in_process", outcomes=outcomes, message=f"{ok} of {len(outcomes)} partition(s) done in-process")

"""Backfills of one strategy's stem sets: the plan from the instance's records, and launching it.

:func:`plan_backfill` reads the states (:func:`~stemset_assets.defs.status.read_status`)
and plans with :mod:`stemset_assets.core.backfill_plan`. :func:`launch_backfill` starts a real
Dagster backfill: through the webserver's GraphQL (``launchPartitionBackfill``; the daemon then
groups partitions into runs by the stem assets' backfill policy) when a webserver URL is
configured and answers, otherwise in this process (:func:`stemset_assets.defs.runs.materialize_in_process`)
with a progress callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dagster import DagsterInstance

from gpu_worker.stores.base import ObjectStore

from ..config import StemsetConfig
from ..core.backfill_plan import BackfillPlan, check_request, plan_from_states, with_admission
from ..core.run_tags import BACKFILL_ESTIMATE_TAG, HELD_BACK_TAG, gpu_tags
from ..core.status import SetStatus, history
from .runs import RunOutcome, materialize_in_process, selection_for
from .spending import guard
from .status import read_status
from .webserver import WebserverClient


def plan_backfill(
    instance: DagsterInstance,
    config: StemsetConfig,
    strategy: str,
    mode: str = "redo",
    profile: str | None = None,
    *,
    store: ObjectStore | None = None,
    states: Sequence[SetStatus] | None = None,
    budget: bool = True,
) -> BackfillPlan:
    """The partitions of ``strategy`` to redo (``mode``: one of ``core.backfill_plan.MODES``;
    default every set that is not current) and their estimate; ``states`` (default: read from the
    instance and the store) are the strategy's set states. With ``budget`` the plan keeps only what
    fits the GPU budget after what the instance records as spent (the rest is ``held_back``)."""
    strategy = check_request(config, strategy, mode, profile)
    if states is None:
        states = read_status(instance, config, [strategy], profile, store=store)
    plan = plan_from_states(config, strategy, mode, profile, states, history(states, strategy))
    if not budget:
        return plan
    return with_admission(plan, config, guard(instance, config, plan.partitions, plan.partition_cost))


def webserver_url(config: StemsetConfig, override: str | None = None) -> str | None:
    if override:
        return override
    dagster = getattr(config, "dagster", None)
    return getattr(dagster, "webserver_url", None)


@dataclass
class LaunchResult:
    path: str  # "webserver" | "in_process" | "nothing"
    backfill_id: str | None = None
    outcomes: list[RunOutcome] = field(default_factory=list)
    message: str = ""

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.success)


def launch_backfill(
    plan: BackfillPlan,
    config: StemsetConfig,
    instance: DagsterInstance,
    *,
    url: str | None = None,
    resources: dict | None = None,
    progress: Callable[[int, int, RunOutcome], None] | None = None,
    say: Callable[[str], None] = print,
) -> LaunchResult:
    """Launch ``plan``: a partition backfill through the webserver when ``url`` (or the config's
    ``dagster.webserver_url``) answers, else in-process runs."""
    if not plan.partitions:
        return LaunchResult("nothing", message="nothing to do")
    url = webserver_url(config, url)
    if url:
        client = WebserverClient(url)
        if client.reachable():
            assets = selection_for(config, [plan.strategy], plan.include_recording)
            backfill_id = client.launch_partition_backfill(
                plan.partitions,
                assets,
                title=f"stemset backfill {plan.strategy} --{plan.mode}",
                tags={
                    **gpu_tags(),
                    BACKFILL_ESTIMATE_TAG: f"{plan.cost_usd:.6f}",
                    HELD_BACK_TAG: str(len(plan.held_back)),
                },
            )
            return LaunchResult(
                "webserver",
                backfill_id=backfill_id,
                message=f"backfill {backfill_id} launched on {url}: {url}/overview/backfills/{backfill_id}",
            )
        say(f"The Dagster webserver at {url} is not reachable; running the backfill in this process instead.")
    outcomes = materialize_in_process(
        config,
        instance,
        plan.partitions,
        [plan.strategy],
        include_recording=plan.include_recording,
        resources=resources,
        progress=progress,
        tags={"stemset/backfill": f"{plan.strategy}:{plan.mode}", **gpu_tags()},
    )
    ok = sum(1 for o in outcomes if o.success)
    return LaunchResult(
        "in_process", outcomes=outcomes, message=f"{ok} of {len(outcomes)} partition(s) done in-process"
    )

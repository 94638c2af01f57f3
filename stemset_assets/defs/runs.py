"""Launching Stemset's Dagster runs from outside the UI: the CLI, the web API and backfills.

Two paths, one outcome per partition:

- in-process (:func:`materialize_in_process`): ``dagster.materialize`` against the configured
  instance, one run per partition, one partition after another. The model cache lives in this
  process, so a model loads once however many partitions follow.
- through a running webserver (:class:`WebserverClient`): its GraphQL API launches a run of the
  implicit asset job for one partition, or a partition backfill that the daemon then splits
  by the stem assets' backfill policy.

:func:`dagster_instance` picks the instance: ``$DAGSTER_HOME``'s, else a SQLite instance in
``./.dagster_home`` (created, and exported as ``DAGSTER_HOME`` so `dagster dev` started later
from the same folder sees the same runs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_worker.errors import StemsetError

from .partitions import RECORDINGS_PARTITIONS

if TYPE_CHECKING:
    from dagster import AssetKey, DagsterInstance

    from .config import StemsetConfig

DEFAULT_HOME = ".dagster_home"
IMPLICIT_ASSET_JOB = "__ASSET_JOB"
REPOSITORY = "__repository__"
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass(frozen=True)
class RunOutcome:
    partition: str
    success: bool
    run_id: str | None = None
    error: str | None = None


def dagster_instance(config: "StemsetConfig | None" = None) -> "DagsterInstance":
    """``$DAGSTER_HOME``'s instance, else a SQLite one in ``./.dagster_home`` (created)."""
    from dagster import DagsterInstance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path(DEFAULT_HOME).absolute())
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return DagsterInstance.get()


def register_partitions(instance: "DagsterInstance", keys: Iterable[str]) -> list[str]:
    """Add the keys not yet in ``recordings`` in one request; returns those added."""
    existing = set(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
    new = list(dict.fromkeys(k for k in keys if k not in existing))
    if new:
        instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, new)
    return new


def selection_for(config: "StemsetConfig", strategies: Sequence[str], include_recording: bool = True) -> list["AssetKey"]:
    """``recording`` (optionally) and every stem asset of ``strategies``."""
    from dagster import AssetKey

    from .assets.stems import stem_keys

    unknown = [s for s in strategies if s not in config.strategies]
    if unknown:
        raise StemsetError(f"Unknown strategy {', '.join(map(repr, unknown))}.",
                           f"Use one of: {', '.join(config.strategies)} (config.yaml `strategies`).")
    return ([AssetKey("recording")] if include_recording else []) + list(stem_keys(config, list(strategies)))


def materialize_in_process(
    config: "StemsetConfig",
    instance: "DagsterInstance",
    partition_keys: Sequence[str],
    strategies: Sequence[str],
    *,
    include_recording: bool = True,
    resources: dict[str, Any] | None = None,
    progress: Callable[[int, int, RunOutcome], None] | None = None,
    tags: dict[str, str] | None = None,
) -> list[RunOutcome]:
    """Materialise ``recording`` (optionally) and the stems of ``strategies`` for each partition,
    one run per partition in this process; a failed partition does not stop the others.
    ``progress(done, total, outcome)`` is called after each."""
    from dagster import AssetSelection, materialize

    from .definitions import build_definitions

    selection = selection_for(config, strategies, include_recording)
    register_partitions(instance, partition_keys)
    defs = build_definitions(config, resources=resources)
    assets = list(defs.assets or [])
    outcomes: list[RunOutcome] = []
    for i, pk in enumerate(partition_keys):
        result = materialize(
            assets, selection=AssetSelection.assets(*selection), partition_key=pk, instance=instance,
            resources=dict(defs.resources or {}), raise_on_error=False, tags={"stemset/launched_by": "stemset", **(tags or {})},
        )
        outcome = RunOutcome(pk, result.success, result.run_id, None if result.success else _failure_message(result))
        outcomes.append(outcome)
        if progress is not None:
            progress(i + 1, len(partition_keys), outcome)
    return outcomes


def materialize_catalog(config: "StemsetConfig", instance: "DagsterInstance",
                        resources: dict[str, Any] | None = None) -> RunOutcome:
    """Materialise the unpartitioned ``catalog`` asset in this process."""
    from dagster import AssetKey, AssetSelection, materialize

    from .definitions import build_definitions

    defs = build_definitions(config, resources=resources)
    result = materialize(list(defs.assets or []), selection=AssetSelection.assets(AssetKey("catalog")),
                         instance=instance, resources=dict(defs.resources or {}), raise_on_error=False,
                         tags={"stemset/launched_by": "stemset"})
    return RunOutcome("catalog", result.success, result.run_id, None if result.success else _failure_message(result))


def _failure_message(result) -> str:
    """The first step failure's user-facing text: a Failure's description, else the error's
    message without Dagster's exception class prefix."""
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return f"{event.step_key}: {data.user_failure_data.description.strip()}"
        if data.error is not None:
            return f"{event.step_key}: {data.error.message.strip().split(': ', 1)[-1]}"
    return "the run failed; see its logs in the Dagster UI"


class WebserverClient:
    """The few GraphQL calls Stemset makes to a running `dagster dev` / dagster-webserver."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._location: str | None = None

    def query(self, document: str, variables: dict | None = None) -> dict:
        import httpx

        try:
            resp = httpx.post(f"{self.url}/graphql", json={"query": document, "variables": variables or {}},
                              timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise StemsetError(f"The Dagster webserver at {self.url} is unreachable ({type(err).__name__}).",
                               "Start it (`stemset dev`), or unset dagster.webserver_url to run in-process.") from None
        if resp.status_code != 200:
            raise StemsetError(f"The Dagster webserver at {self.url} answered HTTP {resp.status_code}.",
                               "Check the URL points at dagster-webserver (it serves /graphql).")
        body = resp.json()
        if body.get("errors"):
            raise StemsetError(f"Dagster GraphQL error: {body['errors'][0].get('message', body['errors'][0])}",
                               "Check that the webserver runs the same Stemset version as this CLI.")
        return body["data"]

    def reachable(self) -> bool:
        try:
            self.query("{ version }")
        except StemsetError:
            return False
        return True

    def location(self) -> str:
        """The code location that serves Stemset's job (``stemset`` in workspace.yaml)."""
        if self._location is None:
            data = self.query("{ repositoriesOrError { __typename ... on RepositoryConnection"
                              " { nodes { name location { name } pipelines { name } } } } }")
            nodes = (data.get("repositoriesOrError") or {}).get("nodes") or []
            for node in nodes:
                if any(p["name"] == IMPLICIT_ASSET_JOB or p["name"].startswith("process_") for p in node["pipelines"]):
                    self._location = node["location"]["name"]
                    break
            else:
                raise StemsetError(f"No Stemset code location is loaded in the webserver at {self.url}.",
                                   "Start it with `stemset dev` (workspace.yaml), or check the location loads.")
        return self._location

    def launch_run(self, partition_key: str, asset_keys: Sequence["AssetKey"], tags: dict[str, str] | None = None) -> str:
        """Launch one run of ``asset_keys`` for ``partition_key``; returns the run id."""
        params = {
            "selector": {"repositoryLocationName": self.location(), "repositoryName": REPOSITORY,
                         "jobName": IMPLICIT_ASSET_JOB, "assetSelection": [{"path": k.path} for k in asset_keys]},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in
                                           {"dagster/partition": partition_key, **(tags or {})}.items()]},
        }
        data = self.query(
            "mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename"
            " ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }", {"p": params})
        return self._ok(data["launchRun"], lambda d: d["run"]["runId"])

    def launch_partition_backfill(self, partition_keys: Sequence[str], asset_keys: Sequence["AssetKey"],
                                  title: str | None = None) -> str:
        """Launch an asset backfill of ``asset_keys`` over ``partition_keys``; returns its id."""
        params = {"partitionNames": list(partition_keys), "assetSelection": [{"path": k.path} for k in asset_keys],
                  "title": title, "tags": [{"key": "stemset/launched_by", "value": "stemset"}]}
        data = self.query(
            "mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename"
            " ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }", {"p": params})
        return self._ok(data["launchPartitionBackfill"], lambda d: d["backfillId"])

    def run_status(self, run_id: str) -> str:
        """QUEUED, NOT_STARTED, STARTING, STARTED, SUCCESS, FAILURE, CANCELING or CANCELED."""
        data = self.query("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status }"
                          " ... on Error { message } } }", {"id": run_id})
        return self._ok(data["runOrError"], lambda d: d["status"])

    def wait(self, run_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
        """Poll until the run ends (or ``timeout_s``); returns its last status."""
        deadline = time.monotonic() + timeout_s
        status = self.run_status(run_id)
        while status not in RUN_DONE and time.monotonic() < deadline:
            time.sleep(poll_s)
            status = self.run_status(run_id)
        return status

    def _ok(self, payload: dict, pick: Callable[[dict], str]) -> str:
        try:
            return pick(payload)
        except (KeyError, TypeError):
            raise StemsetError(f"The Dagster webserver refused: {payload.get('__typename')}: "
                               f"{payload.get('message', 'no message')}",
                               "Check the partition and assets exist in the loaded code location.") from None

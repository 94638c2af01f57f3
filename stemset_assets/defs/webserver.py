"""Launching Stemset's runs through a running Dagster webserver (`dagster dev` / dagster-webserver).

Its GraphQL API launches a run of the implicit asset job for one partition, or a partition
backfill that the daemon then splits by the stem assets' backfill policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx
from dagster import AssetKey

from gpu_worker.errors import StemsetError

from ..core.run_tags import STEMS_KEY_PREFIX, gpu_tags

IMPLICIT_ASSET_JOB = "__ASSET_JOB"
REPOSITORY = "__repository__"
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


class WebserverClient:
    """The few GraphQL calls Stemset makes to a running `dagster dev` / dagster-webserver."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._location: str | None = None

    def query(self, document: str, variables: dict | None = None) -> dict:
        try:
            resp = httpx.post(
                f"{self.url}/graphql", json={"query": document, "variables": variables or {}}, timeout=self.timeout_s
            )
        except httpx.HTTPError as err:
            raise StemsetError(
                f"The Dagster webserver at {self.url} is unreachable ({type(err).__name__}).",
                "Start it (`stemset dev`), or unset dagster.webserver_url to run in-process.",
            ) from None
        if resp.status_code != 200:
            raise StemsetError(
                f"The Dagster webserver at {self.url} answered HTTP {resp.status_code}.",
                "Check the URL points at dagster-webserver (it serves /graphql).",
            )
        body = resp.json()
        if body.get("errors"):
            raise StemsetError(
                f"Dagster GraphQL error: {body['errors'][0].get('message', body['errors'][0])}",
                "Check that the webserver runs the same Stemset version as this CLI.",
            )
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
            data = self.query(
                "{ repositoriesOrError { __typename ... on RepositoryConnection"
                " { nodes { name location { name } pipelines { name } } } } }"
            )
            nodes = (data.get("repositoriesOrError") or {}).get("nodes") or []
            for node in nodes:
                if any(p["name"] == IMPLICIT_ASSET_JOB or p["name"].startswith("process_") for p in node["pipelines"]):
                    self._location = node["location"]["name"]
                    break
            else:
                raise StemsetError(
                    f"No Stemset code location is loaded in the webserver at {self.url}.",
                    "Start it with `stemset dev` (workspace.yaml), or check the location loads.",
                )
        return self._location

    def launch_run(self, partition_key: str, asset_keys: Sequence[AssetKey], tags: dict[str, str] | None = None) -> str:
        """Launch one run of ``asset_keys`` for ``partition_key``; returns the run id."""
        params = {
            "selector": {
                "repositoryLocationName": self.location(),
                "repositoryName": REPOSITORY,
                "jobName": IMPLICIT_ASSET_JOB,
                "assetSelection": [{"path": k.path} for k in asset_keys],
            },
            "executionMetadata": {
                "tags": [
                    {"key": k, "value": v}
                    for k, v in {"dagster/partition": partition_key, **_gpu(asset_keys), **(tags or {})}.items()
                ]
            },
        }
        data = self.query(
            "mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename"
            " ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }",
            {"p": params},
        )
        return self._ok(data["launchRun"], lambda d: d["run"]["runId"])

    def launch_partition_backfill(
        self,
        partition_keys: Sequence[str],
        asset_keys: Sequence[AssetKey],
        title: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Launch an asset backfill of ``asset_keys`` over ``partition_keys``; returns its id."""
        params = {
            "partitionNames": list(partition_keys),
            "assetSelection": [{"path": k.path} for k in asset_keys],
            "title": title,
            "tags": [{"key": k, "value": v} for k, v in {"stemset/launched_by": "stemset", **(tags or {})}.items()],
        }
        data = self.query(
            "mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename"
            " ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }",
            {"p": params},
        )
        return self._ok(data["launchPartitionBackfill"], lambda d: d["backfillId"])

    def run_status(self, run_id: str) -> str:
        """QUEUED, NOT_STARTED, STARTING, STARTED, SUCCESS, FAILURE, CANCELING or CANCELED."""
        data = self.query(
            "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } ... on Error { message } } }",
            {"id": run_id},
        )
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
            raise StemsetError(
                f"The Dagster webserver refused: {payload.get('__typename')}: {payload.get('message', 'no message')}",
                "Check the partition and assets exist in the loaded code location.",
            ) from None


def _gpu(asset_keys: Sequence[AssetKey]) -> dict[str, str]:
    """The GPU tag when the selection separates stems (the production queue caps such runs)."""
    return gpu_tags() if any(k.path and k.path[0] == STEMS_KEY_PREFIX for k in asset_keys) else {}

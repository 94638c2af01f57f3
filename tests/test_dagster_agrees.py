"""Dagster's own view of a stem set equals `stemset status`: the stale marks a real
dagster-webserver answers over GraphQL (``staleStatusByPartition``, what the UI draws), plus the
latest ``set_complete`` check for broken sets, against the one state rule, after a single-partition
run, a multi-partition run (as a backfill makes them), a strategy change, a re-upload and deleted
objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetSelection, DagsterInstance, build_sensor_context, materialize

from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.config import load_config
from stemset_assets.core.layout import manifest_key
from stemset_assets.core.partition_keys import assign_partition_keys, list_inputs
from stemset_assets.core.status import status_rows
from stemset_assets.defs.asset_keys import RECORDING_KEY, stem_asset_key
from stemset_assets.defs.build import build_definitions
from stemset_assets.defs.checks import SET_COMPLETE
from stemset_assets.defs.partitions import register_partitions
from stemset_assets.defs.runs import materialize_in_process, selection_for
from stemset_assets.defs.state_sensor import STEM_SET_STATE
from tests.audio_fixtures import music_like, write_audio
from tests.configs import tiny_config_yaml
from tests.model_fixtures import make_model_repo
from tests.webserver import dagster_webserver

STALE_QUERY = """
query Stale($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodes(assetKeys: [$key]) { staleStatusByPartition(partitions: $partitions) }
}"""
RELOAD = """
mutation { reloadRepositoryLocation(repositoryLocationName: "stemset") {
  __typename ... on WorkspaceLocationEntry { name } } }"""
DAGSTER_TO_STATE = {"FRESH": "current", "STALE": "stale", "MISSING": "missing"}
PARAMS = "htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}"


def dagster_states(client, instance: DagsterInstance, config, partitions: list[str]) -> dict[str, str]:
    """What Dagster says of each partition's htdemucs set: its stale mark, or broken while the
    latest ``set_complete`` evaluation failed."""
    key = stem_asset_key("htdemucs", config.strategy("htdemucs").stems[0])
    data = client.query(STALE_QUERY, {"key": {"path": list(key.path)}, "partitions": partitions})
    marks = data["assetNodes"][0]["staleStatusByPartition"]
    failing = failing_check_partitions(instance, key)
    return {pk: "broken" if pk in failing else DAGSTER_TO_STATE[m] for pk, m in zip(partitions, marks, strict=True)}


def failing_check_partitions(instance: DagsterInstance, key) -> set[str]:
    latest: dict[str, bool] = {}
    history = instance.event_log_storage.get_asset_check_execution_history(AssetCheckKey(key, SET_COMPLETE), limit=100)
    for record in reversed(history):  # oldest first: the latest evaluation of each partition wins
        evaluation = record.event.dagster_event.event_specific_data if record.event else None
        if evaluation is not None and getattr(evaluation, "partition", None):
            latest[evaluation.partition] = evaluation.passed
    return {pk for pk, passed in latest.items() if not passed}


def stemset_states(store, config, partitions: list[str]) -> dict[str, str]:
    return {r.partition: r.state for r in status_rows(store, config, partitions, ["htdemucs"])}


def run_sensor_like_the_daemon(instance, config) -> None:
    """Evaluate ``stem_set_state`` and record its check evaluations, as the daemon does."""
    defs = build_definitions(config)
    sensor = defs.get_sensor_def(STEM_SET_STATE)
    with build_sensor_context(
        instance=instance, definitions=defs, sensor_name=STEM_SET_STATE, resources=dict(defs.resources or {})
    ) as context:
        result = sensor.evaluate_tick(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)


@pytest.mark.timeout(900)
def test_dagster_staleness_equals_stemset_status(tmp_path: Path):
    repo = make_model_repo(tmp_path / "models")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config_yaml(repo, tmp_path / "media", sections="sensors:\n  settle_s: 86400\n"))
    config = load_config(config_path, env={})
    store = LocalObjectStore(tmp_path / "media")
    for i, name in enumerate("abcd"):
        write_audio(tmp_path / f"{name}.wav", music_like(1.0, seed=i), 44100)
        store.upload(tmp_path / f"{name}.wav", f"inputs/h4n/{name}.wav")
    pks = sorted(assign_partition_keys("h4n", list_inputs(store, "h4n")).values())
    a, b, c, d = pks
    home = tmp_path / "home"
    with dagster_webserver(home, config_path) as client:
        instance = DagsterInstance.from_config(str(home))
        register_partitions(instance, pks)

        def agree(expected: dict[str, str], cfg=config) -> None:
            ours = stemset_states(store, cfg, pks)
            assert ours == expected
            assert dagster_states(client, instance, cfg, pks) == ours

        # A single-partition run.
        assert materialize_in_process(config, instance, [a], ["htdemucs"])[0].success
        agree({a: "current", b: "missing", c: "missing", d: "missing"})

        # Many partitions in one run, as a backfill's multi-run policy launches the stems.
        defs = build_definitions(config)
        assets = list(defs.assets or [])
        resources = dict(defs.resources or {})

        def run(selection, **kw) -> None:
            assert materialize(assets, selection=selection, instance=instance, resources=resources, **kw).success

        recording_only = AssetSelection.assets(RECORDING_KEY)
        for pk in (b, c):
            run(recording_only, partition_key=pk)
        stems_only = AssetSelection.assets(*selection_for(config, ["htdemucs"], include_recording=False))
        run(stems_only, tags={"dagster/asset_partition_range_start": b, "dagster/asset_partition_range_end": c})
        agree({a: "current", b: "current", c: "current", d: "missing"})

        # A re-upload of a with new content, picked up (the recording re-made): stale.
        write_audio(tmp_path / "a2.wav", music_like(1.0, seed=42), 44100)
        store.upload(tmp_path / "a2.wav", "inputs/h4n/a.wav")
        run(recording_only, partition_key=a)
        agree({a: "stale", b: "current", c: "current", d: "missing"})

        # Deleted objects: c's input (the set stays current: Dagster agrees) and one of b's stems
        # (broken: the set_complete check the state sensor records fails).
        store.delete("inputs/h4n/c.wav")
        vocals = json.loads(store.get_bytes(manifest_key(b, "htdemucs")))["stems"]["vocals"]["key"]
        store.delete(vocals)
        run_sensor_like_the_daemon(instance, config)
        agree({a: "stale", b: "broken", c: "current", d: "missing"})

        # The strategy changes: the code location reloads, every made set goes stale in both.
        config_path.write_text(
            config_path.read_text().replace(PARAMS, PARAMS.replace("}", ", __params: {overlap: 0.5}}"))
        )
        changed = load_config(config_path, env={})
        client.query(RELOAD)
        agree({a: "stale", b: "broken", c: "stale", d: "missing"}, changed)

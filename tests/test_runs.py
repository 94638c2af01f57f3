"""Launching runs from outside the UI (:mod:`stemset_assets.defs.runs`): in-process against a real
SQLite instance, and through a real dagster-webserver's GraphQL on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from gpu_worker.errors import StemsetError
from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.config import load_config
from stemset_assets.core.layout import manifest_key
from stemset_assets.core.partition_keys import assign_partition_keys, list_inputs
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS, register_partitions
from stemset_assets.defs.runs import dagster_instance, materialize_in_process, selection_for
from stemset_assets.defs.webserver import WebserverClient
from tests.audio_fixtures import music_like, write_audio
from tests.configs import tiny_config_yaml
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import free_port
from tests.webserver import dagster_daemon, dagster_webserver

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path: Path):
    """A project folder: config (local storage, tiny models), two inputs (one of them not audio)."""
    repo = make_model_repo(tmp_path / "models")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        tiny_config_yaml(repo, tmp_path / "media", strategies=("htdemucs_ft: {_: htdemucs_ft, vocals: vocals}",))
    )
    config = load_config(config_path, env={})
    store = LocalObjectStore(tmp_path / "media")
    write_audio(tmp_path / "take.wav", music_like(1.5, seed=3), 44100)
    store.upload(tmp_path / "take.wav", "inputs/h4n/Take One.wav")
    store.put_bytes("inputs/h4n/notes.wav", b"this is not audio at all" * 10)
    keys = assign_partition_keys("h4n", list_inputs(store, "h4n"))
    return config, config_path, store, keys


def test_in_process_runs_each_partition_and_reports_failures(project, tmp_path, monkeypatch):
    config, _, store, keys = project
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    instance = dagster_instance(config)
    assert (tmp_path / "home").is_dir()
    good, bad = keys["inputs/h4n/Take One.wav"], keys["inputs/h4n/notes.wav"]
    seen = []
    outcomes = materialize_in_process(
        config,
        instance,
        [bad, good],
        ["htdemucs"],
        progress=lambda done, total, o: seen.append((done, total, o.partition)),
    )
    assert seen == [(1, 2, bad), (2, 2, good)]
    by_key = {o.partition: o for o in outcomes}
    assert by_key[good].success and by_key[good].run_id
    assert store.exists(manifest_key(good, "htdemucs"))
    assert not by_key[bad].success and "recording" in by_key[bad].error
    assert not store.exists(manifest_key(bad, "htdemucs"))
    # the partitions were registered, and the run is in the instance with its partition tag
    assert set(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)) == {good, bad}
    run = instance.get_run_by_id(by_key[good].run_id)
    assert run.tags["dagster/partition"] == good and run.tags["stemset/launched_by"] == "stemset"
    assert register_partitions(instance, [good, "h4n/new_one"]) == ["h4n/new_one"]


def test_unknown_strategy_names_the_valid_ones(project):
    config = project[0]
    with pytest.raises(StemsetError, match="htdemucs_ft"):
        selection_for(config, ["nope"])
    assert selection_for(config, ["htdemucs"])[0] == AssetKey("recording")


def test_unreachable_webserver_is_a_clear_error():
    client = WebserverClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert not client.reachable()
    with pytest.raises(StemsetError, match="unreachable"):
        client.run_status("x")


def test_runs_and_backfills_through_a_real_webserver(project, tmp_path):
    config, config_path, store, keys = project
    home = tmp_path / "home"
    with dagster_webserver(home, config_path) as client:
        instance = DagsterInstance.from_config(str(home))
        good = keys["inputs/h4n/Take One.wav"]
        register_partitions(instance, keys.values())
        assert client.location() == "stemset"
        run_id = client.launch_run(good, selection_for(config, ["htdemucs"]), tags={"stemset/job": "t1"})
        assert client.wait(run_id, timeout_s=240, poll_s=1) == "SUCCESS"
        assert store.exists(manifest_key(good, "htdemucs"))
        assert instance.get_run_by_id(run_id).tags["dagster/partition"] == good

        backfill_id = client.launch_partition_backfill(
            list(keys.values()), selection_for(config, ["htdemucs"]), title="test backfill"
        )
        backfill = instance.get_backfill(backfill_id)
        assert backfill is not None
        assert set(
            backfill.asset_backfill_data.target_subset.get_partitions_subset(AssetKey("recording")).get_partition_keys()
        ) == set(keys.values())
        bad_run = client.launch_run(keys["inputs/h4n/notes.wav"], selection_for(config, ["htdemucs"]))
        assert client.wait(bad_run, timeout_s=240, poll_s=1) == "FAILURE"


def test_a_daemon_backfill_groups_the_stem_partitions_into_one_run(tmp_path):
    """A real backfill (webserver GraphQL + dagster-daemon): `recording` one run per partition,
    then the stems of all partitions in one run (BackfillPolicy.multi_run)."""
    repo = make_model_repo(tmp_path / "models")
    config_path = tmp_path / "config.yaml"
    # settle_s: the new_recordings sensor, running in the daemon too, leaves these inputs alone
    config_path.write_text(tiny_config_yaml(repo, tmp_path / "media", sections="sensors:\n  settle_s: 86400\n"))
    config = load_config(config_path, env={})
    store = LocalObjectStore(tmp_path / "media")
    for i in range(3):
        write_audio(tmp_path / f"t{i}.wav", music_like(1.0, seed=i), 44100)
        store.upload(tmp_path / f"t{i}.wav", f"inputs/h4n/t{i}.wav")
    keys = list(assign_partition_keys("h4n", list_inputs(store, "h4n")).values())
    home = tmp_path / "home"
    with dagster_webserver(home, config_path) as client:
        instance = DagsterInstance.from_config(str(home))
        register_partitions(instance, keys)
        with dagster_daemon(home, config_path):
            backfill_id = client.launch_partition_backfill(keys, selection_for(config, ["htdemucs"]))
            deadline = time.monotonic() + 300
            while instance.get_backfill(backfill_id).status.value == "REQUESTED":
                assert time.monotonic() < deadline, "the backfill did not finish in 300 s"
                time.sleep(2)
    assert instance.get_backfill(backfill_id).status.value == "COMPLETED_SUCCESS"
    runs = [r for r in instance.get_runs() if r.status.value == "SUCCESS"]
    stem_runs = [r for r in runs if AssetKey(["stems", "htdemucs", "vocals"]) in (r.asset_selection or ())]
    assert len(stem_runs) == 1
    tags = stem_runs[0].tags
    assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (
        keys[0],
        keys[-1],
    )
    assert sum(AssetKey("recording") in (r.asset_selection or ()) for r in runs) == 3
    assert all(store.exists(manifest_key(k, "htdemucs")) for k in keys)

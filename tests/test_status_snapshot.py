"""A wide ``stemset status`` from the kept rows of the latest listing plus what runs changed since:
equal to a fresh listing where only Stemset wrote, behind it (until the next listing) where
something else did, and never used across a rule change, a stale listing or a broken value."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from dagster import DagsterRunStatus, build_sensor_context, instance_for_test
from dagster._core.test_utils import create_run_for_test

from stemset_assets.cli.main import main
from stemset_assets.core.layout import manifest_key
from stemset_assets.core.status import SetStatus, columns_frame, status_columns, status_frame
from stemset_assets.core.status_snapshot import StatusSnapshot, merge, rule_digest
from stemset_assets.defs import status_snapshot
from stemset_assets.defs.build import build_definitions
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource
from stemset_assets.defs.state_sensor import STEM_SET_STATE
from stemset_assets.defs.status import read_status
from stemset_assets.defs.status_snapshot import changed_partitions, load_snapshot, save_snapshot, whole_status
from tests.asset_world import World, model_repo_fixture, write_config  # noqa: F401 - a pytest fixture
from tests.audio_fixtures import music_like

PARAMS = "__params: {shifts: 1, overlap: 0.25}"


def row(pk: str, strategy: str = "htdemucs", state: str = "missing", **kw) -> SetStatus:
    return SetStatus(pk, pk.split("/")[0], strategy, state, kw.pop("reason", ""), "", True, 1.5, True, **kw)


# --------------------------------------------------------------------------- the rows, kept


def test_rows_survive_encoding_and_give_the_frame_a_listing_gives():
    rows = [row("h4n/a", cost_usd=0.25, fingerprint="f1"), row("h4n/a", "other", "unused"), row("h4n/b", "htdemucs")]
    rows.append(SetStatus("memos/c", "memos", "htdemucs", "broken", "stem_missing", "bass gone", False, None, None))
    raw, rows_id = StatusSnapshot.of_rows(rows, 100.0, "d1").encode()
    back = StatusSnapshot.decode(raw)
    assert back is not None and (back.listed_at, back.digest, back.rows_id, back.rows) == (100.0, "d1", rows_id, 4)
    pd.testing.assert_frame_equal(columns_frame(back.columns), status_frame(rows))
    assert StatusSnapshot.of_rows(rows[:3], 5.0, "d1").encode()[1] != rows_id  # other rows, other id
    assert StatusSnapshot.of_rows(rows, 5.0, "d2").encode()[1] != rows_id  # other rule inputs, other id
    assert StatusSnapshot.of_rows(rows, 5.0, "d1").encode()[1] == rows_id  # a later listing of the same rows


@pytest.mark.parametrize(
    "raw",
    [None, "", "not json", "[]", '{"format": 0}', '{"format": 1, "listed_at": 1, "digest": "d", "columns": {}}'],
)
def test_anything_but_a_snapshot_decodes_to_none(raw):
    assert StatusSnapshot.decode(raw) is None


def test_a_snapshot_with_ragged_columns_is_refused():
    raw, _ = StatusSnapshot.of_rows([row("h4n/a"), row("h4n/b")], 1.0, "d").encode()
    doc = json.loads(raw)
    doc["columns"]["state"].pop()
    assert StatusSnapshot.decode(json.dumps(doc)) is None


def test_merge_takes_reread_rows_drops_unregistered_and_keeps_the_order():
    kept = StatusSnapshot.of_rows(
        [row("h4n/a"), row("h4n/a", "x"), row("h4n/b"), row("h4n/b", "x"), row("h4n/gone")], 1.0, "d"
    )
    fresh = [row("h4n/b", state="current"), row("h4n/b", "x", "current"), row("h4n/new"), row("h4n/new", "x")]
    columns = merge(kept, ["h4n/a", "h4n/b", "h4n/new"], fresh, {"h4n/b", "h4n/new"})
    got = list(zip(columns["partition"], columns["strategy"], columns["state"], strict=True))
    assert got == [
        ("h4n/a", "htdemucs", "missing"),
        ("h4n/a", "x", "missing"),
        ("h4n/b", "htdemucs", "current"),
        ("h4n/b", "x", "current"),
        ("h4n/new", "htdemucs", "missing"),
        ("h4n/new", "x", "missing"),
    ]
    assert merge(kept, ["h4n/a", "h4n/b", "h4n/gone"], [], set()) is kept.columns  # nothing changed
    with pytest.raises(ValueError, match="neither in the snapshot nor re-read"):
        merge(kept, ["h4n/a", "h4n/other"], [], set())


def test_the_rule_digest_follows_what_the_rows_depend_on(tmp_path, model_repo):
    base = rule_digest(write_config(tmp_path / "a", model_repo))
    assert rule_digest(write_config(tmp_path / "b", model_repo)) == base
    cosmetic = write_config(tmp_path / "c", model_repo, extra="\nsensors: {interval_s: 99}\n")
    assert rule_digest(cosmetic) == base
    params = write_config(tmp_path / "d", model_repo, replace=(PARAMS, "__params: {shifts: 2, overlap: 0.25}"))
    fmt = write_config(tmp_path / "e", model_repo, replace=("output: {format: flac}", "output: {format: wav}"))
    price = write_config(tmp_path / "f", model_repo, extra="\ngpu: {prices_per_hour: {A100-40GB: 9.0}}\n")
    assert len({base, rule_digest(params), rule_digest(fmt), rule_digest(price)}) == 4


# --------------------------------------------------------------------------- against a bucket and an instance


@pytest.fixture
def world(tmp_path, model_repo, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = write_config(tmp_path / "cfg", model_repo)
    with instance_for_test(temp_dir=str(home)) as instance:
        world = World(config, MediaStoreResource.from_config(config), instance, tmp_path)
        for name, seed in (("take_a", 1), ("take_b", 2)):
            world.put_input(f"inputs/h4n/{name}.wav", music_like(1.0, seed=seed), 44100)
        world.register("h4n")
        yield world


def status(world: World, config=None, **kw):
    return whole_status(world.instance, config or world.config, store=world.store, min_partitions=0, **kw)


def states(df: pd.DataFrame) -> dict[str, str]:
    return {r.partition: r.state for r in df[df["strategy"] == "htdemucs"].itertuples()}


def test_runs_are_seen_at_once_and_outside_changes_at_the_next_listing(world: World, monkeypatch):
    monkeypatch.setattr(status_snapshot, "CLOCK_MARGIN_S", 0.0)  # only runs after the listing count
    assert world.run("h4n/take_a", ["htdemucs"]).success
    listed, src = status(world)
    assert not src.from_snapshot and states(listed) == {"h4n/take_a": "current", "h4n/take_b": "missing"}

    kept, src = status(world)
    assert (src.from_snapshot, src.reread) == (True, 0)
    pd.testing.assert_frame_equal(kept, listed)

    # A run after the listing: its recording is re-read, the rest comes from the kept rows.
    assert world.run("h4n/take_b", ["htdemucs"]).success
    after_run, src = status(world)
    assert (src.from_snapshot, src.reread) == (True, 1)
    assert states(after_run) == {"h4n/take_a": "current", "h4n/take_b": "current"}
    pd.testing.assert_frame_equal(after_run, status(world, fresh=True)[0])

    # A stem deleted by hand is not a run: the kept rows miss it until a listing finds it.
    time.sleep(0.01)
    stem = json.loads(world.store.get_bytes(manifest_key("h4n/take_a", "htdemucs")))["stems"]["bass"]["key"]
    world.store.delete(stem)
    assert states(status(world)[0])["h4n/take_a"] == "current"
    fresh, src = status(world, fresh=True)
    assert not src.from_snapshot and states(fresh)["h4n/take_a"] == "broken"
    again, src = status(world)
    assert src.from_snapshot and states(again)["h4n/take_a"] == "broken"

    # Registered since the listing: read; no longer registered: gone.
    world.put_input("inputs/h4n/take_c.wav", music_like(1.0, seed=3), 44100)
    world.register("h4n")
    added, src = status(world)
    assert src.from_snapshot and src.reread == 1 and states(added)["h4n/take_c"] == "missing"
    world.instance.delete_dynamic_partition(RECORDINGS_PARTITIONS, "h4n/take_c")
    dropped, src = status(world)
    assert src.from_snapshot and "h4n/take_c" not in states(dropped)


def test_a_rule_change_an_old_listing_or_a_run_range_means_a_listing(world: World):
    assert world.run("h4n/take_a", ["htdemucs"]).success
    status(world)
    assert status(world)[1].from_snapshot

    changed = write_config(world.tmp / "cfg2", world.config.models.repo, replace=(PARAMS, "__params: {shifts: 2}"))
    df, src = status(world, changed)
    assert not src.from_snapshot and states(df)["h4n/take_a"] == "stale"

    rows = read_status(world.instance, world.config, store=world.store)
    save_snapshot(world.instance, world.store, world.config, rows, time.time() - 3600)  # an hour old
    assert not status(world)[1].from_snapshot

    # Too few recordings for the kept rows to pay: always listed.
    df, src = whole_status(world.instance, world.config, store=world.store, min_partitions=3)
    assert not src.from_snapshot


def test_runs_name_the_recordings_they_may_have_written(world: World):
    order = ["h4n/p0", "h4n/p1", "h4n/p2", "h4n/p3", "h4n/p4"]
    start = time.time()
    create_run_for_test(world.instance, tags={"dagster/partition": "h4n/p0"}, status=DagsterRunStatus.SUCCESS)
    create_run_for_test(
        world.instance,
        tags={"dagster/asset_partition_range_start": "h4n/p2", "dagster/asset_partition_range_end": "h4n/p3"},
        status=DagsterRunStatus.FAILURE,
    )
    create_run_for_test(world.instance, tags={"stemset/launched_by": "catalog"})  # no partition
    assert changed_partitions(world.instance, start, order) == {"h4n/p0", "h4n/p2", "h4n/p3"}
    # Long after: only runs still going count, whenever they were last updated.
    create_run_for_test(world.instance, tags={"dagster/partition": "h4n/p4"}, status=DagsterRunStatus.STARTED)
    assert changed_partitions(world.instance, time.time() + 3600, order) == {"h4n/p4"}
    # A range over partitions no longer registered cannot be resolved: list instead.
    assert changed_partitions(world.instance, start, ["h4n/p0", "h4n/p4"]) is None


def test_the_rows_are_written_only_when_they_change(world: World):
    store, key = world.store, status_snapshot.SNAPSHOT_KEY + world.store.uri("outputs")
    rows = read_status(world.instance, world.config, store=store)
    save_snapshot(world.instance, store, world.config, rows, 100.0)
    first = world.instance.daemon_cursor_storage.get_cursor_values({key})[key]
    save_snapshot(world.instance, store, world.config, rows, 200.0)
    assert world.instance.daemon_cursor_storage.get_cursor_values({key})[key] == first  # rows not rewritten
    assert load_snapshot(world.instance, store).listed_at == 200.0  # but dated by the later listing
    save_snapshot(world.instance, store, world.config, rows[:1], 300.0)
    snap = load_snapshot(world.instance, store)
    assert (snap.rows, snap.listed_at) == (1, 300.0)
    world.instance.daemon_cursor_storage.set_cursor_values({key: "{broken"})
    assert load_snapshot(world.instance, store) is None


def test_the_state_sensor_keeps_the_rows_it_read(world: World):
    defs = build_definitions(world.config, resources=world.resources())
    before = time.time()
    with build_sensor_context(
        instance=world.instance, definitions=defs, sensor_name=STEM_SET_STATE, resources=world.resources()
    ) as context:
        defs.get_sensor_def(STEM_SET_STATE).evaluate_tick(context)
    snap = load_snapshot(world.instance, world.store)
    assert snap is not None and snap.listed_at >= before
    assert sorted(set(snap.columns["partition"])) == ["h4n/take_a", "h4n/take_b"]
    assert snap.rows == 2 * len(world.config.strategies)
    assert status_columns(read_status(world.instance, world.config, store=world.store)) == snap.columns


def test_the_status_command_says_where_its_states_come_from(world: World, monkeypatch, capsys):
    monkeypatch.setattr(status_snapshot, "MIN_PARTITIONS", 0)
    cfg = str(world.config.path)
    assert main(["--config", cfg, "status"]) == 0
    assert "States from the bucket listing" not in capsys.readouterr().out
    assert main(["--config", cfg, "status", "-s", "htdemucs"]) == 0
    out = capsys.readouterr().out
    assert "States from the bucket listing of" in out and "--fresh lists now" in out
    assert "htdemucs_6s" not in out  # the strategy filter applies to kept rows too
    assert main(["--config", cfg, "status", "--fresh", "--json", "--profile", "h4n"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"]["from_snapshot"] is False
    assert {f["partition"] for f in doc["files"]} == {"h4n/take_a", "h4n/take_b"}

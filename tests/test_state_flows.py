"""The one state rule in the flows a user meets: content that comes back (A -> B -> A) runs again
while the same upload never runs twice; a deleted manifest or stem is found by status and
redone by the default backfill; the ``stem_set_state`` sensor refreshes the catalog only when
a state changed. Local folder, ephemeral Dagster instance, tiny models, 1 s inputs."""

from __future__ import annotations

import json

import pytest
from dagster import SensorResult, build_sensor_context

from stemset_assets.core.layout import manifest_key, read_record
from stemset_assets.defs.asset_keys import CATALOG_KEY
from stemset_assets.defs.backfill import plan_backfill
from stemset_assets.defs.build import build_definitions
from stemset_assets.defs.state_sensor import STEM_SET_STATE
from stemset_assets.defs.status import read_status
from tests.asset_world import World, local_world, model_repo_fixture, write_config  # noqa: F401 - a pytest fixture
from tests.audio_fixtures import music_like
from tests.test_sensors import Ticker

SENSORS = "\nsensors: {settle_s: 0, max_new_per_tick: 50}\n"


@pytest.fixture
def world(tmp_path, model_repo) -> World:
    return local_world(tmp_path, write_config(tmp_path / "cfg", model_repo, extra=SENSORS))


class Daemon(Ticker):
    """:class:`Ticker` (the sensor evaluated as the daemon does) plus the daemon's run-key rule:
    a run is launched only for a run key never launched before."""

    def __init__(self, world: World):
        super().__init__(world.instance, world.media)
        self.world, self.run_keys = world, set()

    def launch(self) -> list[str]:
        ran = []
        for req in self.tick(self.world.config).run_requests or []:
            if req.run_key in self.run_keys:
                continue
            self.run_keys.add(req.run_key)
            assert self.world.run(req.partition_key, ["htdemucs"]).success
            ran.append(req.partition_key)
        return ran


def state(world: World, pk: str) -> tuple[str, str]:
    row = next(
        r for r in read_status(world.instance, world.config, ["htdemucs"], store=world.store) if r.partition == pk
    )
    return row.state, row.reason


def test_content_that_comes_back_runs_again_and_one_upload_runs_once(world: World):
    daemon = Daemon(world)
    takes = {name: music_like(1.0, seed=seed) for name, seed in (("A", 1), ("B", 2))}
    shas = {}
    for step, name in enumerate(["A", "B", "A"]):
        world.put_input("inputs/h4n/take.wav", takes[name], 44100)
        assert daemon.launch() == ["h4n/take"], f"upload {step + 1} ({name}) did not run"
        assert daemon.launch() == []  # the same upload: never twice
        record = read_record(world.store, "h4n/take")
        manifest = json.loads(world.store.get_bytes(manifest_key("h4n/take", "htdemucs")))
        assert manifest["input_sha256"] == record.source_sha256
        shas.setdefault(name, record.source_sha256)
        assert record.source_sha256 == shas[name]
        assert state(world, "h4n/take") == ("current", "up_to_date")
    assert shas["A"] != shas["B"] and len(daemon.run_keys) == 3


@pytest.mark.parametrize("victim", ["manifest", "stem"])
def test_a_deleted_object_is_found_and_the_default_backfill_repairs_it(world: World, victim: str):
    world.put_input("inputs/h4n/take.wav", music_like(1.0, seed=3), 44100)
    world.put_input("inputs/h4n/other.wav", music_like(1.0, seed=4), 44100)
    world.register("h4n")
    for pk in ("h4n/take", "h4n/other"):
        assert world.run(pk, ["htdemucs"]).success
    manifest = json.loads(world.store.get_bytes(manifest_key("h4n/take", "htdemucs")))
    world.store.delete(
        manifest_key("h4n/take", "htdemucs") if victim == "manifest" else manifest["stems"]["drums"]["key"]
    )
    # The manifest is the set's commit point: without it the set folder is an unpublished attempt
    # (missing, swept by the next publish); a stem gone from a published set is broken.
    expected = ("missing", "not_separated") if victim == "manifest" else ("broken", "stem_missing")
    got, reason = state(world, "h4n/take")
    assert (got, reason.split(";")[0]) == expected
    assert state(world, "h4n/other") == ("current", "up_to_date")

    plan = plan_backfill(world.instance, world.config, "htdemucs", store=world.store)  # default mode: redo
    assert plan.partitions == ["h4n/take"]
    assert world.run("h4n/take", ["htdemucs"], with_recording=False).success
    assert state(world, "h4n/take") == ("current", "up_to_date")
    assert plan_backfill(world.instance, world.config, "htdemucs", store=world.store).partitions == []


def test_the_state_sensor_refreshes_the_catalog_only_on_a_change(world: World):
    defs = build_definitions(world.config, resources=world.resources())
    sensor = defs.get_sensor_def(STEM_SET_STATE)
    cursor = [None]

    def tick() -> SensorResult:
        with build_sensor_context(
            instance=world.instance,
            cursor=cursor[0],
            definitions=defs,
            sensor_name=STEM_SET_STATE,
            resources=world.resources(),
        ) as context:
            result = sensor.evaluate_tick(context)
        cursor[0] = result.cursor
        return result

    world.put_input("inputs/h4n/take.wav", music_like(1.0, seed=5), 44100)
    world.register("h4n")
    first = tick()
    assert [r.asset_selection for r in first.run_requests] == [[CATALOG_KEY]]
    assert not tick().run_requests  # nothing changed: no catalog run
    assert world.run("h4n/take", ["htdemucs"]).success
    after_run = tick()
    assert len(after_run.run_requests) == 1 and after_run.run_requests[0].run_key != first.run_requests[0].run_key
    assert not tick().run_requests and not tick().asset_events

    # A stem object deleted behind Dagster's back: a catalog run and a failed set_complete check.
    manifest = json.loads(world.store.get_bytes(manifest_key("h4n/take", "htdemucs")))
    world.store.delete(manifest["stems"]["bass"]["key"])
    broken = tick()
    assert len(broken.run_requests) == 1
    [check] = broken.asset_events
    assert (check.check_name, check.passed, check.partition) == ("set_complete", False, "h4n/take")
    assert "bass" in check.description
    assert not tick().asset_events  # reported once, not every tick

"""Per-file staleness, `stemset backfill --dry-run` numbers, an in-process backfill of exactly the
stale partitions, and the auto_reprocess sensor: SeaweedFS bucket, SQLite Dagster instance,
tiny Demucs models, 1 s inputs, three partitions of which two are materialised.
"""

from __future__ import annotations

import json

import pytest
from dagster import AssetKey, build_sensor_context, instance_for_test

from stemset_assets.cli.main import main
from stemset_assets.core.status import status_frame, summary
from stemset_assets.core.stemsets import fingerprints
from stemset_assets.defs.asset_keys import stem_keys
from stemset_assets.defs.backfill import launch_backfill, plan_backfill
from stemset_assets.defs.sensors import build_auto_reprocess_sensor, build_new_recordings_sensor
from stemset_assets.defs.status import read_status
from tests.asset_world import World, model_repo_fixture, s3_media, write_config  # noqa: F401 - a pytest fixture
from tests.audio_fixtures import music_like

PARAMS = "__params: {shifts: 1, overlap: 0.25}"
SENSORS = "\nsensors: {settle_s: 0, max_new_per_tick: 50}\n"


def rows(df):
    return {(r.partition, r.strategy): r for r in df.itertuples()}


def staleness(instance, config, strategies=None, profile=None, **kw):
    return status_frame(read_status(instance, config, strategies, profile, **kw))


@pytest.fixture
def world(tmp_path, model_repo, seaweed, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    media = s3_media(seaweed)
    with instance_for_test(temp_dir=str(home)) as instance:
        config = write_config(tmp_path / "cfg", model_repo, extra=SENSORS)
        yield World(config, media, instance, tmp_path)


def tick_new_recordings(world: World) -> list[str]:
    result = build_new_recordings_sensor(world.config)(
        build_sensor_context(instance=world.instance, resources={"media_store": world.media})
    )
    for req in result.dynamic_partitions_requests or []:
        world.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return [r.partition_key for r in result.run_requests or []]


def cli_config(path, world: World, monkeypatch):
    """The config file at ``path`` pointed at the test bucket (credentials through the environment)."""
    media = world.media
    monkeypatch.setenv("TEST_S3_KEY", media.access_key_id)
    monkeypatch.setenv("TEST_S3_SECRET", media.secret_access_key)
    text = path.read_text()
    local = "storage:\n  backend: local\n  local: {root: ./media}"
    assert local in text
    path.write_text(
        text.replace(
            local,
            (
                f"storage:\n  backend: s3\n  s3:\n    endpoint_url: {media.endpoint_url}\n    bucket: {media.bucket}\n"
                f"    region: {media.region}\n    access_key_id: ${{TEST_S3_KEY}}\n    secret_access_key: ${{TEST_S3_SECRET}}"
            ),
        )
    )
    return path


def test_staleness_dry_run_backfill_and_auto_reprocess(
    world: World,
    model_repo,
    tmp_path,
    capsys,
    monkeypatch,
):
    store = world.store
    for i, name in enumerate(["a", "b", "c"]):
        world.put_input(f"inputs/h4n/{name}.wav", music_like(1.0, seed=i), 44100)
    assert sorted(tick_new_recordings(world)) == ["h4n/a", "h4n/b", "h4n/c"]
    for pk in ("h4n/a", "h4n/b"):
        assert world.run(pk, ["htdemucs"]).success

    # Under the config they were made with: a, b current; c registered but never run.
    df = staleness(world.instance, world.config, ["htdemucs", "htdemucs_6s"], store=store)
    r = rows(df)
    assert r[("h4n/a", "htdemucs")].state == "current" and r[("h4n/b", "htdemucs")].reason == "up_to_date"
    assert r[("h4n/c", "htdemucs")].state == "missing"
    assert r[("h4n/c", "htdemucs")].reason == "recording_not_materialised"
    # No profile runs htdemucs_6s: unused, not missing (nothing to do).
    assert {r[(pk, "htdemucs_6s")].state for pk in ("h4n/a", "h4n/b", "h4n/c")} == {"unused"}
    assert r[("h4n/a", "htdemucs")].duration_s == pytest.approx(1.0, abs=1e-3)

    # The strategy's params change: exactly the processed partitions go stale; others untouched.
    changed = write_config(
        tmp_path / "cfg2", model_repo, extra=SENSORS, replace=(PARAMS, "__params: {shifts: 1, overlap: 0.5}")
    )
    assert fingerprints(changed)["htdemucs"] != fingerprints(world.config)["htdemucs"]
    store.delete("inputs/h4n/b.wav")  # a deleted input: kept and reported, nothing crashes
    df = staleness(world.instance, changed, store=store)
    r = rows(df)
    assert r[("h4n/a", "htdemucs")].state == "stale" and r[("h4n/a", "htdemucs")].reason == "strategy_changed"
    assert r[("h4n/b", "htdemucs")].state == "stale"
    assert r[("h4n/b", "htdemucs")].reason == "strategy_changed;input_missing"
    assert r[("h4n/b", "htdemucs")].input_present is False
    assert r[("h4n/c", "htdemucs")].state == "missing"
    assert r[("h4n/a", "htdemucs_ft")].state == "unused"
    table = summary(df).set_index("strategy")
    assert table.loc["htdemucs", ["current", "stale", "missing", "inputs_missing"]].tolist() == [0, 2, 1, 1]
    assert table.loc["htdemucs_ft", ["unused", "missing"]].tolist() == [3, 0]

    # --dry-run: numbers from the CLI, through the same instance (DAGSTER_HOME) and bucket.
    cfg2 = str(cli_config(tmp_path / "cfg2" / "config.yaml", world, monkeypatch))
    assert main(["--config", cfg2, "backfill", "--strategy", "htdemucs", "--stale-only", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["count"] == 2 and sorted(plan["partitions"]) == ["h4n/a", "h4n/b"]
    assert plan["audio_hours"] == pytest.approx(2.0 / 3600, abs=1e-4)
    assert plan["estimate_source"].startswith("recorded") and plan["estimated_cost_usd"] == 0
    assert plan["include_recording"] is False
    assert main(["--config", cfg2, "backfill", "-s", "htdemucs", "--missing-only", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 missing partition(s)" in out and "dry run: nothing launched" in out
    # On a billed GPU backend: audio seconds x the configured rate x the price.
    billed = write_config(
        tmp_path / "cfg3",
        model_repo,
        extra=SENSORS + "backfill: {billed_seconds_per_audio_second: 30}\n",
        replace=(PARAMS, "__params: {shifts: 1, overlap: 0.5}"),
    )
    billed = type(billed)(**{**billed.__dict__, "gpu": type(billed.gpu)(backend="modal", type="H100")})
    p = plan_backfill(world.instance, billed, "htdemucs", "stale", store=store)
    assert p.count == 2 and p.estimate.source.startswith("config default")
    # Modal bills the GPU and the cores and memory reserved with it (config: cost) over the held seconds.
    per_hour = 4.00 + billed.cost.gpu_container_cpu * billed.cost.cpu_per_core_hour
    per_hour += billed.cost.gpu_container_memory_gib * billed.cost.memory_per_gib_hour
    assert p.cost_usd == pytest.approx(2.0 * 30 * per_hour / 3600, rel=1e-2)
    assert main(["--config", cfg2, "backfill", "-s", "nope", "--dry-run"]) == 1
    assert "Use one of: htdemucs, htdemucs_ft" in capsys.readouterr().err
    assert main(["--config", cfg2, "status", "--profile", "nope"]) == 1
    assert "Use one of: h4n, memos" in capsys.readouterr().err
    assert main(["--config", cfg2, "status", "--strategy", "htdemucs"]) == 0
    out = capsys.readouterr().out
    assert "h4n" in out and "1 recording(s) whose input file is gone" in out

    # auto_reprocess: one stale partition per tick (the cap); a zero ceiling on a billed backend holds all back.
    auto_cfg = write_config(
        tmp_path / "cfg4",
        model_repo,
        replace=(PARAMS, "__params: {shifts: 1, overlap: 0.5}"),
        extra="\nsensors:\n  settle_s: 0\n  auto_reprocess:\n    htdemucs: {enabled: true, max_per_tick: 1}\n",
    )
    ctx = build_sensor_context(instance=world.instance, resources={"media_store": world.media})
    result = build_auto_reprocess_sensor(auto_cfg, "htdemucs")(ctx)
    assert len(result.run_requests) == 1
    req = result.run_requests[0]
    assert req.partition_key in ("h4n/a", "h4n/b") and set(req.asset_selection) == set(
        stem_keys(auto_cfg, ["htdemucs"])
    )
    broke = type(auto_cfg)(
        **{
            **auto_cfg.__dict__,
            "gpu": type(auto_cfg.gpu)(backend="modal", type="H100"),
            "sensors": type(auto_cfg.sensors)(
                auto_reprocess={"htdemucs": type(auto_cfg.sensors.auto_reprocess["htdemucs"])(True, 5, 0.0)}
            ),
        }
    )
    result = build_auto_reprocess_sensor(broke, "htdemucs")(ctx)
    assert not result.run_requests and "cost ceiling" in result.skip_reason.skip_message

    # The backfill, in-process (the configured webserver is unreachable): only the stale ones run.
    said = []
    plan = plan_backfill(world.instance, changed, "htdemucs", "stale", store=store)
    launched = launch_backfill(
        plan, changed, world.instance, url="http://127.0.0.1:9", resources=world.resources(), say=said.append
    )
    assert launched.path == "in_process" and "not reachable" in said[0]
    assert sorted(o.partition for o in launched.outcomes) == ["h4n/a", "h4n/b"]
    assert all(o.success for o in launched.outcomes), [o.error for o in launched.outcomes]
    r = rows(staleness(world.instance, changed, ["htdemucs"], store=store))
    assert r[("h4n/a", "htdemucs")].state == "current" and r[("h4n/b", "htdemucs")].state == "current"
    assert r[("h4n/c", "htdemucs")].state == "missing"
    assert world.instance.get_latest_materialization_event(AssetKey("recording")) is not None
    assert not list(store.list("recordings/h4n/c/")) and not list(store.list("outputs/h4n/c/"))

    # A re-upload with other content: stale (input_changed) until the recording is redone.
    world.put_input("inputs/h4n/a.wav", music_like(1.0, seed=42), 44100)
    r = rows(staleness(world.instance, changed, ["htdemucs"], store=store))
    assert r[("h4n/a", "htdemucs")].state == "stale" and r[("h4n/a", "htdemucs")].reason == "input_changed"
    assert plan_backfill(world.instance, changed, "htdemucs", "stale", store=store).include_recording is True


# --------------------------------------------------------------------------- input_changed by ETag

ETAG_CONFIG = """
storage: {backend: local, local: {root: ./media}}
profiles:
  h4n: {strategies: [htdemucs]}
strategies:
  htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}
"""


class RecordingOnly:
    """The real ``recording`` asset on a store and a SQLite instance; the stem set is reported as a
    runless event carrying what the stems asset records, so no model runs."""

    def __init__(self, tmp_path, media, instance):
        from stemset_assets.config import load_config

        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.yaml").write_text(ETAG_CONFIG)
        self.config = load_config(tmp_path / "cfg" / "config.yaml", env={})
        self.media, self.instance, self.tmp = media, instance, tmp_path
        self.store = media.get_store()

    def put(self, key: str, seed: int) -> None:
        from tests.audio_fixtures import write_audio

        local = self.tmp / "upload" / key.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        write_audio(local, music_like(1.0, seed=seed), 44100)
        self.store.upload(local, key)

    def record(self, pk: str):
        from dagster import materialize

        from stemset_assets.defs.assets.recording import recording

        if pk not in self.instance.get_dynamic_partitions("recordings"):
            self.instance.add_dynamic_partitions("recordings", [pk])
        result = materialize(
            [recording], instance=self.instance, partition_key=pk, resources={"media_store": self.media}
        )
        assert result.success
        (event,) = result.get_asset_materialization_events()
        return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}

    def separated(self, pk: str) -> None:
        """A published stem set of the recording as it stands (what the worker writes), no model run."""
        source_sha = json.loads(self.store.get_bytes(f"recordings/{pk}/recording.json"))["source_sha256"]
        fp = fingerprints(self.config)["htdemucs"]
        stems = {}
        for stem in ("drums", "bass", "other", "vocals"):
            key = f"outputs/{pk}/htdemucs/{stem}.m4a"
            self.store.put_bytes(key, b"stem")
            stems[stem] = {"key": key, "bytes": 4, "format": "m4a"}
        self.store.put_bytes(
            f"outputs/{pk}/htdemucs/manifest.json",
            json.dumps(
                {
                    "fingerprint": fp,
                    "input_sha256": source_sha,
                    "stems": stems,
                    "billed_seconds": 0.5,
                    "backend": "local",
                    "input_duration_s": 1.0,
                }
            ).encode(),
        )

    def row(self, pk: str):
        return rows(staleness(self.instance, self.config, store=self.store))[(pk, "htdemucs")]


def test_input_changed_is_the_etag_on_s3(tmp_path, seaweed):
    """SeaweedFS: the ETag is the content's MD5, so an identical re-upload is no change (even well
    after the materialisation, where the old modification-time guess said input_changed) and new
    content of the very same size is."""
    import time

    media = s3_media(seaweed)
    (tmp_path / "dagster").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        w = RecordingOnly(tmp_path, media, instance)
        w.put("inputs/h4n/a.wav", seed=1)
        meta = w.record("h4n/a")
        head = w.store.head("inputs/h4n/a.wav")
        assert meta["input_etag"] == head.etag and meta["original_key"] == "inputs/h4n/a.wav"
        w.separated("h4n/a")
        assert w.row("h4n/a").reason == "up_to_date"

        time.sleep(1.5)  # S3 times are whole seconds: a later modification time, the same ETag
        w.put("inputs/h4n/a.wav", seed=1)  # the same bytes again
        again = w.store.head("inputs/h4n/a.wav")
        assert again.etag == head.etag and again.last_modified > head.last_modified
        r = w.row("h4n/a")
        assert r.state == "current" and r.reason == "up_to_date"

        w.put("inputs/h4n/a.wav", seed=2)  # other content, same length and size
        changed = w.store.head("inputs/h4n/a.wav")
        assert changed.size == head.size and changed.etag != head.etag
        r = w.row("h4n/a")
        assert r.state == "stale" and r.reason == "input_changed"

        meta2 = w.record("h4n/a")  # the recording is redone: the stem set is now behind it, not the input
        assert meta2["input_etag"] == changed.etag and meta2["sha256"] != meta["sha256"]
        r = w.row("h4n/a")
        assert r.state == "stale" and r.reason == "recording_changed"


def test_touch_on_local_storage_is_input_changed_until_recorded(tmp_path):
    """Local storage's ETag is size-mtime-inode (LocalObjectStore), so a touch with identical
    content is reported as input_changed; re-materialising the recording reuses its FLAC (same
    sha256), records the new ETag, and the stem set is current again."""
    import os

    from stemset_assets.defs.resources import MediaStoreResource

    media = MediaStoreResource(backend="local", root=str(tmp_path / "media"))
    (tmp_path / "dagster").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        w = RecordingOnly(tmp_path, media, instance)
        w.put("inputs/h4n/a.wav", seed=1)
        meta = w.record("h4n/a")
        w.separated("h4n/a")
        assert w.row("h4n/a").reason == "up_to_date"

        path = tmp_path / "media" / "inputs" / "h4n" / "a.wav"
        before = w.store.head("inputs/h4n/a.wav")
        later = path.stat().st_mtime + 10
        os.utime(path, (later, later))  # touch: same bytes, new modification time
        assert w.store.head("inputs/h4n/a.wav").etag != before.etag
        r = w.row("h4n/a")
        assert r.state == "stale" and r.reason == "input_changed"

        again = w.record("h4n/a")
        assert again["reused"] is True and again["sha256"] == meta["sha256"]
        assert again["input_etag"] == w.store.head("inputs/h4n/a.wav").etag
        r = w.row("h4n/a")
        assert r.state == "current" and r.reason == "up_to_date"

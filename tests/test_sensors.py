"""The ``new_recordings`` sensor on a real SeaweedFS bucket and a real (SQLite) Dagster instance.

Hundreds of input objects drain over ticks with none missed and none twice; uploads between
ticks, re-uploads with new (and with the same) content, a deleted input and uploads still in
progress. No materialisation here: the sensor only lists, registers partitions and requests runs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from dagster import AssetKey, SensorResult, build_sensor_context, instance_for_test

from stemset_assets.config import StemsetConfig, load_config
from stemset_assets.defs.asset_keys import stem_keys
from stemset_assets.defs.build import build_definitions
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource
from stemset_assets.defs.sensors import (
    NEW_RECORDINGS,
    build_new_recordings_sensor,
    decode_cursor,
    encode_cursor,
    object_digest,
    scan_new_inputs,
)
from tests.asset_world import s3_media

CONFIG = """
storage: {backend: local, local: {root: ./media}}
sensors:
  max_new_per_tick: %(per_tick)d
  settle_s: %(settle)d
%(auto)s
profiles:
  h4n: {strategies: [htdemucs]}
  memos: {strategies: [htdemucs, six]}
strategies:
  htdemucs: {_: htdemucs, drums: drums, bass: bass, other: other, vocals: vocals}
  six: {_: htdemucs_6s, drums: drums, bass: bass, other: other, vocals: vocals, guitar: guitar, piano: piano}
"""


def make_config(folder: Path, per_tick: int = 100, settle: int = 0, auto: str = "") -> StemsetConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(CONFIG % {"per_tick": per_tick, "settle": settle, "auto": auto})
    return load_config(path, env={})


@pytest.fixture
def bucket(seaweed) -> MediaStoreResource:
    return s3_media(seaweed)


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def content(tag: str) -> bytes:
    return b"RIFF" + hashlib.sha256(tag.encode()).digest() * 4


class Ticker:
    """Evaluates the sensor like the daemon does: cursor carried over, partitions added."""

    def __init__(self, instance, media: MediaStoreResource):
        self.instance, self.media, self.cursor = instance, media, None
        self.requested: list = []

    def tick(self, config: StemsetConfig) -> SensorResult:
        sensor = build_new_recordings_sensor(config)
        ctx = build_sensor_context(instance=self.instance, cursor=self.cursor, resources={"media_store": self.media})
        result = sensor(ctx)
        assert isinstance(result, SensorResult)
        for req in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        self.cursor = result.cursor
        self.requested += list(result.run_requests or [])
        return result


def partitions(instance) -> set[str]:
    return set(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))


def test_hundreds_of_inputs_drain_over_ticks_none_missed_none_twice(tmp_path, bucket, instance):
    store = bucket.get_store()
    config = make_config(tmp_path / "cfg", per_tick=100)
    names = [f"inputs/h4n/take {i:03d}.wav" for i in range(180)] + [f"inputs/memos/memo_{i:02d}.m4a" for i in range(70)]
    for name in names:
        store.put_bytes(name, content(name))
    # Not recordings: skipped every tick, never requested.
    store.put_bytes("inputs/h4n/notes.txt", b"setlist")
    store.put_bytes("inputs/h4n/empty.wav", b"")
    store.put_bytes("inputs/h4n/big take.wav.part", content("partial"))

    ticker = Ticker(instance, bucket)
    sizes = []
    for _ in range(4):
        result = ticker.tick(config)
        sizes.append(len(result.run_requests or []))
        # Every run's partition is registered by the same tick (one request for all new keys).
        adds = result.dynamic_partitions_requests or []
        assert len(adds) <= 1
        assert {r.partition_key for r in result.run_requests or []} <= partitions(instance)
    assert sizes == [100, 100, 50, 0]
    assert ticker.tick(config).skip_reason is not None

    keys = [r.partition_key for r in ticker.requested]
    run_keys = [r.run_key for r in ticker.requested]
    assert len(keys) == len(set(keys)) == 250 and len(set(run_keys)) == 250
    assert partitions(instance) == set(keys)
    assert "h4n/take_000" in keys and "memos/memo_69" in keys
    tags = {r.tags["stemset/input_key"] for r in ticker.requested}
    assert tags == set(names)
    by_pk = {r.partition_key: r for r in ticker.requested}
    etag = store.head("inputs/h4n/take 007.wav").etag.strip('"')
    assert by_pk["h4n/take_007"].run_key == f"h4n/take_007@{etag}@new"
    # Each profile's own strategies, plus the recording.
    assert set(by_pk["h4n/take_007"].asset_selection) == {AssetKey("recording"), *stem_keys(config, ["htdemucs"])}
    assert set(by_pk["memos/memo_01"].asset_selection) == {
        AssetKey("recording"),
        *stem_keys(config, ["htdemucs", "six"]),
    }
    # Oldest first: the first tick took the first 100 uploads.
    assert [r.partition_key for r in ticker.requested[:3]] == ["h4n/take_000", "h4n/take_001", "h4n/take_002"]
    # The cursor is compact: 6-byte digests, about 8 characters an object.
    assert len(ticker.cursor) < 250 * 9 + 100


def test_uploads_between_ticks_reuploads_deletes_and_uploads_in_progress(tmp_path, bucket, instance):
    store = bucket.get_store()
    config = make_config(tmp_path / "cfg", per_tick=50)
    for i in range(5):
        store.put_bytes(f"inputs/h4n/t{i}.wav", content(f"t{i}"))
    ticker = Ticker(instance, bucket)
    assert len(ticker.tick(config).run_requests) == 5

    # New uploads between ticks: exactly those are requested.
    store.put_bytes("inputs/h4n/t5.wav", content("t5"))
    store.put_bytes("inputs/memos/idea.flac", content("idea"))
    result = ticker.tick(config)
    assert sorted(r.partition_key for r in result.run_requests) == ["h4n/t5", "memos/idea"]

    # Re-upload with the same bytes: same ETag, nothing to do. With new bytes: the same partition
    # runs again under a new run key, and no partition is added.
    store.put_bytes("inputs/h4n/t1.wav", content("t1"))
    assert not ticker.tick(config).run_requests
    old_key = next(r.run_key for r in ticker.requested if r.partition_key == "h4n/t1")
    store.put_bytes("inputs/h4n/t1.wav", content("t1 take two"))
    before = partitions(instance)
    result = ticker.tick(config)
    assert [r.partition_key for r in result.run_requests] == ["h4n/t1"]
    assert result.run_requests[0].run_key != old_key
    assert not result.dynamic_partitions_requests and partitions(instance) == before

    # A deleted input: its partition stays, nothing is requested, the tick does not fail.
    gone = object_digest("inputs/h4n/t2.wav", store.head("inputs/h4n/t2.wav").etag)
    assert gone in decode_cursor(ticker.cursor)
    store.delete("inputs/h4n/t2.wav")
    result = ticker.tick(config)
    assert not result.run_requests and "h4n/t2" in partitions(instance)
    assert gone not in decode_cursor(ticker.cursor)  # the cursor keeps only listed objects

    # Uploads in progress: a just-written object waits for settle_s; a temporary name never runs.
    slow = make_config(tmp_path / "slow", per_tick=50, settle=3600)
    store.put_bytes("inputs/h4n/fresh.wav", content("fresh"))
    store.put_bytes("inputs/h4n/fresh2.wav.partial", content("fresh2"))
    assert not ticker.tick(slow).run_requests
    assert "h4n/fresh" not in partitions(instance)
    result = ticker.tick(config)  # settled (settle_s 0): now it runs, once
    assert [r.partition_key for r in result.run_requests] == ["h4n/fresh"]
    assert not ticker.tick(config).run_requests
    keys = [r.partition_key for r in ticker.requested]
    assert Counter(keys)["h4n/t1"] == 2 and all(c == 1 for k, c in Counter(keys).items() if k != "h4n/t1")


def test_skip_reasons_are_logged_and_the_cap_is_reported(tmp_path, bucket):
    store = bucket.get_store()
    config = make_config(tmp_path / "cfg", per_tick=2, settle=3600)
    for i in range(3):
        store.put_bytes(f"inputs/h4n/a{i}.wav", content(f"a{i}"))
    store.put_bytes("inputs/h4n/readme.md", b"hi")
    store.put_bytes("inputs/h4n/zero.flac", b"")
    store.put_bytes("inputs/h4n/~lock.wav", content("lock"))

    class Log(list):
        def info(self, msg):
            self.append(msg)

    log = Log()
    import time

    batch, handled, skips = scan_new_inputs(config, store, [], set(), time.time(), log)
    assert batch == [] and skips["upload in progress"] == 4 and skips["not an audio file name"] == 1
    assert skips["zero bytes"] == 1
    text = "\n".join(log)
    assert "inputs/h4n/readme.md" in text and "inputs/h4n/zero.flac" in text and "settle_s 3600" in text

    log.clear()
    batch, handled, _ = scan_new_inputs(config, store, [], set(), time.time() + 7200, log)
    assert [pk for _, _, pk in batch] == ["h4n/a0", "h4n/a1"] and len(handled) == 2
    assert any("3 new input(s); taking 2" in m for m in log)
    assert decode_cursor(encode_cursor(handled)) == handled
    assert decode_cursor("not json") == set()


def test_definitions_carry_the_sensors_and_bad_auto_reprocess_config_is_refused(tmp_path):
    from dagster import DefaultSensorStatus

    from gpu_worker.errors import ConfigError

    config = make_config(tmp_path / "cfg", auto="  auto_reprocess:\n    six: {enabled: true, max_per_tick: 3}")
    defs = build_definitions(config)
    assert defs.get_sensor_def(NEW_RECORDINGS).minimum_interval_seconds == config.sensors.interval_s
    auto = defs.get_sensor_def("auto_reprocess_six")
    assert auto.default_status == DefaultSensorStatus.RUNNING
    assert config.sensors.auto_reprocess["six"].max_per_tick == 3
    assert config.sensors.auto_reprocess["six"].daily_cost_ceiling_usd == 10.0
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*htdemucs, six"):
        make_config(tmp_path / "bad", auto="  auto_reprocess:\n    nope: {enabled: true}")

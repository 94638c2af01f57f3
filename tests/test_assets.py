"""The Dagster asset catalog end to end: recordings, every strategy's stems, checks and the catalog.

Materialises with ``dagster.materialize`` on a real ephemeral instance (dynamic partitions
added to it), on a local media folder and on the SeaweedFS bucket, with the tiny Demucs models
of ``tests/model_fixtures.py`` and 2-3 s inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    EnvVar,
    materialize,
)

from gpu_worker.audio.resample import resampled_length
from gpu_worker.job import SeparationResult, StemFile
from gpu_worker.stores.base import ObjectStore
from stemset_assets.config import StemsetConfig, load_config
from stemset_assets.core.catalog import build_catalog, markdown_table
from stemset_assets.core.layout import manifest_key, read_record, source_key, stems_prefix
from stemset_assets.core.partition_keys import assign_partition_keys, hashed_key, list_inputs
from stemset_assets.core.stemsets import data_version, fingerprints
from stemset_assets.defs import checks
from stemset_assets.defs.assets.catalog import build_catalog_asset
from stemset_assets.defs.assets.recording import recording
from stemset_assets.defs.assets.stems import build_stems_asset
from stemset_assets.defs.build import build_definitions, process_job_name
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource, SeparatorResource
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo, save_model, tiny_htdemucs

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "Böse Take, #1 [final]|mix.flac"

CONFIG = """
storage:
  backend: local
  local: {root: ./media}
models:
  repo: %(repo)s
profiles:
  h4n:
    strategies: [htdemucs]
    output: {format: flac}
  memos:
    strategies: [htdemucs_6s]
    output: {format: m4a, bitrate: 96}
strategies:
  htdemucs:
    _: htdemucs
    drums: drums
    bass: bass
    other: other
    vocals: vocals
    __params: {shifts: 1, overlap: 0.25}
  htdemucs_ft:
    _: htdemucs_ft
    drums: drums
    bass: bass
    other: other
    vocals: vocals
  htdemucs_6s:
    _: htdemucs_6s
    drums: drums
    bass: bass
    other: other
    vocals: vocals
    guitar: guitar
    piano: piano
  vocals_guitar_piano:
    _: htdemucs_ft
    drums: drums
    bass: bass
    vocals: vocals
    other:
      _: htdemucs_6s
      guitar: guitar
      piano: piano
      other: other
"""

NAN_STRATEGY = """
  nan_probe:
    _: nan_demucs
    drums: drums
    bass: bass
    other: other
    vocals: vocals
"""


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory) -> Path:
    repo = make_model_repo(tmp_path_factory.mktemp("models"))
    broken = tiny_htdemucs(seed=99)
    for p in broken.parameters():
        p.data.fill_(float("nan"))
    save_model(broken, repo, "0dd0beef")
    (repo / "nan_demucs.yaml").write_text("models: ['0dd0beef']\n")
    return repo


def write_config(folder: Path, repo: Path, extra: str = "", replace: tuple[str, str] | None = None) -> StemsetConfig:
    text = CONFIG % {"repo": repo} + extra
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(text)
    return load_config(path, env={})


# --------------------------------------------------------------------------- a small world


@dataclass
class World:
    config: StemsetConfig
    media: MediaStoreResource
    instance: DagsterInstance
    tmp: Path

    @property
    def store(self) -> ObjectStore:
        return self.media.get_store()

    def resources(self) -> dict:
        return {"media_store": self.media, "separator": SeparatorResource()}

    def put_input(self, key: str, wav: np.ndarray, sr: int) -> None:
        local = self.tmp / "upload" / Path(key).name
        local.parent.mkdir(parents=True, exist_ok=True)
        write_audio(local, wav, sr)
        self.store.upload(local, key)

    def register(self, profile: str) -> dict[str, str]:
        """What the new-input sensor does: partition keys for the profile's inputs, added to the instance."""
        existing = self.instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
        keys = assign_partition_keys(profile, list_inputs(self.store, profile), existing)
        self.instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, [k for k in keys.values() if k not in existing])
        return keys

    def run(self, pk: str, strategies=None, config: StemsetConfig | None = None, with_recording=True, **kw):
        config = config or self.config
        names = list(config.strategies) if strategies is None else strategies
        assets = ([recording] if with_recording else []) + [build_stems_asset(config, n) for n in names]
        return materialize(assets, instance=self.instance, partition_key=pk, resources=self.resources(), **kw)

    def run_catalog(self, config: StemsetConfig | None = None):
        return materialize(
            [build_catalog_asset(config or self.config)], instance=self.instance, resources=self.resources()
        )


def local_world(tmp: Path, config: StemsetConfig) -> World:
    return World(config, MediaStoreResource(backend="local", root=str(tmp / "media")), DagsterInstance.ephemeral(), tmp)


def s3_world(tmp: Path, config: StemsetConfig, seaweed) -> World:
    media = MediaStoreResource(
        backend="s3",
        endpoint_url=seaweed.endpoint_url,
        bucket=seaweed.make_bucket(),
        region=seaweed.region,
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
        max_attempts=2,
    )
    return World(config, media, DagsterInstance.ephemeral(), tmp)


def materializations(result) -> dict[str, object]:
    out = {}
    for ev in result.get_asset_materialization_events():
        m = ev.event_specific_data.materialization
        out[m.asset_key.to_user_string()] = m
    return out


def meta(m, key):
    return m.metadata[key].value


def check_results(result) -> dict[tuple[str, str], object]:
    return {(ev.asset_key.to_user_string(), ev.check_name): ev for ev in result.get_asset_check_evaluations()}


def failure_text(result) -> str:
    parts = []
    for ev in result.all_events:
        if ev.event_type == DagsterEventType.STEP_FAILURE:
            data = ev.event_specific_data
            if data.user_failure_data is not None:
                parts.append(data.user_failure_data.description or "")
            if data.error is not None:
                parts.append(data.error.message)
    return "\n".join(parts)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- end to end, both stores


@pytest.fixture(params=["local", "s3"])
def world(request, tmp_path, model_repo) -> World:
    config = write_config(tmp_path / "cfg", model_repo)
    if request.param == "local":
        return local_world(tmp_path, config)
    return s3_world(tmp_path, config, request.getfixturevalue("seaweed"))


def test_recordings_stems_checks_and_catalog(world: World):
    store = world.store
    inputs = {
        "inputs/h4n/Take 1.wav": (music_like(1.5, seed=1), 44100),
        "inputs/h4n/take_1.wav": (music_like(1.2, sr=48000, seed=2), 48000),  # same slug as "Take 1"
        f"inputs/memos/{HOSTILE}": (music_like(1.3, sr=48000, channels=1, seed=3), 48000),
    }
    for key, (wav, sr) in inputs.items():
        world.put_input(key, wav, sr)
        time.sleep(0.01)
    world.put_input("inputs/h4n/later.wav", music_like(1.0, seed=4), 44100)  # registered, never run
    keys = {**world.register("h4n"), **world.register("memos")}
    assert keys["inputs/h4n/Take 1.wav"] == "h4n/take_1"
    assert keys["inputs/h4n/take_1.wav"] == hashed_key("h4n", "inputs/h4n/take_1.wav")
    assert keys[f"inputs/memos/{HOSTILE}"] == "memos/bose_take_1_final_mix"
    fps = fingerprints(world.config)

    for obj, (wav, sr) in inputs.items():
        pk = keys[obj]
        result = world.run(pk)
        assert result.success
        mats = materializations(result)

        # recording: metadata, data version, canonical FLAC, peaks and waveform in the store
        rec = mats["recording"]
        raw = store.get_bytes(obj)
        assert meta(rec, "original_key") == obj
        assert meta(rec, "sha256") == sha256(raw)
        assert rec.tags["dagster/data_version"] == sha256(raw)
        assert meta(rec, "sample_rate") == sr and meta(rec, "channels") == wav.shape[0]
        assert meta(rec, "format") in ("wav", "flac") and meta(rec, "codec")
        assert meta(rec, "duration_s") == pytest.approx(wav.shape[1] / sr, abs=1e-3)
        assert -40 < meta(rec, "lufs") < 0 and -3 < meta(rec, "peak_dbfs") <= 0
        assert meta(rec, "uri") == store.uri(source_key(pk))
        assert meta(rec, "waveform").endswith("waveform.png") or "waveform.png" in meta(rec, "waveform")
        assert meta(rec, "waveform_preview").startswith("![waveform](data:image/png;base64,")
        data, rate = sf.read(io.BytesIO(store.get_bytes(source_key(pk))), always_2d=True)
        assert rate == 44100 and data.shape == (resampled_length(wav.shape[1], sr, 44100), 2)
        assert store.get_bytes(f"recordings/{pk}/waveform.png").startswith(b"\x89PNG")
        assert len(json.loads(store.get_bytes(f"recordings/{pk}/peaks.json"))["max"]) == 800
        record = read_record(store, pk)
        assert record.original_key == obj and record.sha256 == sha256(raw)

        profile = world.config.profile(pk.split("/")[0])
        for name, strategy in world.config.strategies.items():
            prefix = stems_prefix(pk, name)
            manifest = SeparationResult.from_json(store.get_bytes(manifest_key(pk, name)))
            assert manifest.fingerprint == fps[name] and manifest.input_sha256 == record.source_sha256
            for stem in strategy.stems:
                m = mats[f"stems/{name}/{stem}"]
                key = manifest.stems[stem].key  # in the set folder the manifest names (issue 14)
                assert key.startswith(f"{prefix}/v-") and key.endswith(f"/{stem}.{profile.output.format}")
                info = store.head(key)
                assert info is not None and meta(m, "bytes") == info.size
                assert meta(m, "uri") == store.uri(key)
                assert meta(m, "url")  # playback link
                assert meta(m, "duration_s") == pytest.approx(data.shape[0] / 44100, abs=1e-3)
                assert meta(m, "strategy") == name and meta(m, "fingerprint") == fps[name]
                assert meta(m, "input_sha256") == record.sha256
                assert meta(m, "backend") == "local" and meta(m, "device").startswith("cpu")
                assert meta(m, "cost_usd") == 0.0 and meta(m, "billed_seconds") > 0
                assert meta(m, "price_per_hour") > 0 and meta(m, "reused") is False
                assert set(meta(m, "timings")) >= {"decode", "separate", "encode", "total"}
                assert isinstance(meta(m, "suggested_gain_db"), float)
                assert m.tags["dagster/data_version"] == data_version(record.sha256, fps[name])
                assert m.tags["dagster/code_version"] == fps[name]
                assert m.partition == pk

        results = check_results(result)
        for name, strategy in world.config.strategies.items():
            for stem in strategy.stems:
                for check in ("duration_matches_input", "finite_samples", "audible"):
                    ev = results[(f"stems/{name}/{stem}", check)]
                    assert ev.passed, (name, stem, check, ev.metadata)
                    assert ev.partition == pk
            first = f"stems/{name}/{strategy.stems[0]}"
            assert results[(first, "set_not_all_silent")].passed
            # Random tiny models do not add up to the mix; the figure is there either way.
            assert "residual_db" in results[(first, "set_reconstructs_mix")].metadata

    # catalog: every partition x strategy, saved as CSV and parquet
    result = world.run_catalog()
    assert result.success
    cat = materializations(result)["catalog"]
    df = pd.read_parquet(io.BytesIO(store.get_bytes("catalog/catalog.parquet")))
    csv = pd.read_csv(io.BytesIO(store.get_bytes("catalog/catalog.csv")))
    assert len(df) == len(csv) == 4 * len(world.config.strategies)
    done = df[df["partition"] != "h4n/later"]
    # Every stored set is current, asked for by the profile or not; what nobody asked for and
    # nothing stores is unused.
    assert set(done["state"]) == {"current"}
    later = df[df["partition"] == "h4n/later"]
    assert set(later[later["default"]]["state"]) == {"missing"} and set(later[~later["default"]]["state"]) == {"unused"}
    assert set(df[df["partition"] == "h4n/later"]["recording_state"]) == {"not_materialised"}
    row = df[(df["partition"] == "memos/bose_take_1_final_mix") & (df["strategy"] == "htdemucs_6s")].iloc[0]
    assert bool(row["default"]) and json.loads(row["stem_uris"])["piano"].endswith("piano.m4a")
    assert row["gpu_seconds"] > 0 and row["cost_usd"] == 0
    assert meta(cat, "recordings") == 4 and meta(cat, "stem_sets") == 3 * len(world.config.strategies)
    assert meta(cat, "audio_hours") == pytest.approx((1.5 + 1.2 + 1.3) / 3600, rel=1e-3)
    assert meta(cat, "gpu_hours") > 0 and meta(cat, "cost_usd") == 0
    assert "| h4n/take_1 | htdemucs | current |" in meta(cat, "preview")
    assert store.get_bytes("catalog/cost_over_time.png").startswith(b"\x89PNG")


# --------------------------------------------------------------------------- reuse, staleness


@pytest.fixture
def small_world(tmp_path, model_repo) -> World:
    world = local_world(tmp_path, write_config(tmp_path / "cfg", model_repo))
    world.put_input("inputs/h4n/take3.wav", music_like(2.0, seed=7), 44100)
    assert world.register("h4n") == {"inputs/h4n/take3.wav": "h4n/take3"}
    return world


def test_unchanged_partition_reuses_its_stems_and_a_new_input_recomputes(small_world: World):
    world, store, pk = small_world, small_world.store, "h4n/take3"
    assert world.run(pk, ["htdemucs"]).success
    stem = SeparationResult.from_json(store.get_bytes(manifest_key(pk, "htdemucs"))).stems["vocals"].key
    before = store.head(stem)
    source_before = store.head(source_key(pk))
    time.sleep(0.05)

    again = world.run(pk, ["htdemucs"])
    assert again.success
    mats = materializations(again)
    assert meta(mats["recording"], "reused") is True
    assert all(meta(mats[f"stems/htdemucs/{s}"], "reused") is True for s in ("drums", "bass", "other", "vocals"))
    assert meta(mats["stems/htdemucs/vocals"], "run_cost_usd") == 0.0
    assert store.head(stem).last_modified == before.last_modified and store.head(stem).etag == before.etag
    assert store.head(source_key(pk)).etag == source_before.etag
    assert all(ev.passed for (k, c), ev in check_results(again).items() if c != "set_reconstructs_mix")

    # New content under the same name: new data version, fresh stems.
    world.put_input("inputs/h4n/take3.wav", music_like(2.0, seed=8), 44100)
    third = world.run(pk, ["htdemucs"])
    mats = materializations(third)
    assert meta(mats["recording"], "reused") is False
    assert meta(mats["stems/htdemucs/vocals"], "reused") is False
    assert store.head(stem) is None  # the old set is removed once the new one is published
    stem = SeparationResult.from_json(store.get_bytes(manifest_key(pk, "htdemucs"))).stems["vocals"].key
    assert store.head(stem).etag != before.etag
    old_version = materializations(again)["stems/htdemucs/vocals"].tags["dagster/data_version"]
    assert mats["stems/htdemucs/vocals"].tags["dagster/data_version"] != old_version


def test_changed_strategy_has_a_new_code_version_and_goes_stale(small_world: World, model_repo, tmp_path):
    world, store, pk = small_world, small_world.store, "h4n/take3"
    assert world.run(pk, ["htdemucs", "htdemucs_6s"]).success
    changed = write_config(
        tmp_path / "cfg2",
        model_repo,
        replace=("__params: {shifts: 1, overlap: 0.25}", "__params: {shifts: 1, overlap: 0.5}"),
    )
    cosmetic = write_config(
        tmp_path / "cfg3",
        model_repo,
        replace=("__params: {shifts: 1, overlap: 0.25}", "__params: {overlap: 0.25, batch_size: 3}"),
    )
    old_fps, new_fps = fingerprints(world.config), fingerprints(changed)
    assert new_fps["htdemucs"] != old_fps["htdemucs"] and new_fps["htdemucs_6s"] == old_fps["htdemucs_6s"]
    assert fingerprints(cosmetic) == old_fps  # batch size and written-out defaults change nothing

    graph = build_definitions(changed).resolve_asset_graph()
    assert graph.get(AssetKey(["stems", "htdemucs", "vocals"])).code_version == new_fps["htdemucs"]

    df = build_catalog(store, changed, [pk]).set_index("strategy")
    assert df.loc["htdemucs", "state"] == "stale" and "strategy_changed" in df.loc["htdemucs", "reason"]
    assert df.loc["htdemucs_6s", "state"] == "current"
    assert df.loc["htdemucs_ft", "state"] == "unused"  # no profile asks for it, nothing stored

    # Materialising under the new strategy recomputes (no reuse) and makes it current again.
    result = world.run(pk, ["htdemucs"], config=changed, with_recording=False)
    mats = materializations(result)
    assert meta(mats["stems/htdemucs/vocals"], "reused") is False
    assert mats["stems/htdemucs/vocals"].tags["dagster/code_version"] == new_fps["htdemucs"]
    assert build_catalog(store, changed, [pk]).set_index("strategy").loc["htdemucs", "state"] == "current"
    assert build_catalog(store, world.config, [pk]).set_index("strategy").loc["htdemucs", "state"] == "stale"


def test_format_change_recomputes_and_removes_old_files(small_world: World, model_repo, tmp_path):
    world, store, pk = small_world, small_world.store, "h4n/take3"
    assert world.run(pk, ["htdemucs"]).success
    as_wav = write_config(tmp_path / "cfg2", model_repo, replace=("output: {format: flac}", "output: {format: wav}"))
    result = world.run(pk, ["htdemucs"], config=as_wav, with_recording=False)
    assert meta(materializations(result)["stems/htdemucs/drums"], "reused") is False
    names = sorted(i.key.rsplit("/", 1)[1] for i in store.list(stems_prefix(pk, "htdemucs") + "/"))
    assert names == ["bass.wav", "drums.wav", "manifest.json", "other.wav", "vocals.wav"]


# --------------------------------------------------------------------------- failures


def test_nan_from_the_model_fails_the_checks(tmp_path, model_repo):
    world = local_world(tmp_path, write_config(tmp_path / "cfg", model_repo, extra=NAN_STRATEGY))
    world.put_input("inputs/h4n/take.wav", music_like(2.0, seed=9), 44100)
    world.register("h4n")
    result = world.run("h4n/take", ["nan_probe"])
    assert result.success  # the stems exist (NaN written as zeros); the checks say what is wrong
    results = check_results(result)
    for stem in ("drums", "bass", "other", "vocals"):
        ev = results[(f"stems/nan_probe/{stem}", "finite_samples")]
        assert not ev.passed and ev.metadata["nonfinite_samples"].value > 0
        assert results[(f"stems/nan_probe/{stem}", "duration_matches_input")].passed
    silent = results[("stems/nan_probe/drums", "set_not_all_silent")]
    assert not silent.passed and silent.metadata["audible_stems"].value == 0
    residual = results[("stems/nan_probe/drums", "set_reconstructs_mix")]
    assert not residual.passed and residual.metadata["residual_db"].value == pytest.approx(0.0, abs=0.01)


def test_non_audio_input_fails_clearly_and_writes_nothing(tmp_path, model_repo):
    world = local_world(tmp_path, write_config(tmp_path / "cfg", model_repo))
    world.store.put_bytes("inputs/h4n/lyrics, v2.wav", b"these are my lyrics, not a recording\n" * 50)
    assert world.register("h4n") == {"inputs/h4n/lyrics, v2.wav": "h4n/lyrics_v2"}
    result = world.run("h4n/lyrics_v2", ["htdemucs"], raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "is not an audio file" in text and "lyrics, v2.wav" in text and "Traceback" not in text
    assert str(tmp_path / "upload") not in text and "stemset-recording-" not in text  # no temp paths
    assert [i.key for i in world.store.list("")] == ["inputs/h4n/lyrics, v2.wav"]


def test_stems_without_a_recording_fail_clearly(small_world: World):
    result = small_world.run("h4n/take3", ["htdemucs"], with_recording=False, raise_on_error=False)
    assert not result.success
    assert "materialise the `recording` asset for this partition first" in failure_text(result)


# --------------------------------------------------------------------------- checks, resources, definitions


def _manifest(durations: dict[str, float], fmt="m4a", peak=-6.0, residual=-30.0, nonfinite=0) -> SeparationResult:
    stems = {
        s: StemFile(
            name=s,
            key=f"o/{s}.{fmt}",
            uri=f"o/{s}.{fmt}",
            format=fmt,
            bytes=1,
            duration_s=d,
            lufs=-20.0,
            peak_dbfs=peak,
            sample_peak=0.5,
            rms_dbfs=-20.0,
            nonfinite_samples=nonfinite,
        )
        for s, d in durations.items()
    }
    return SeparationResult(
        job_id="j",
        strategy_name="s",
        fingerprint="f",
        input_key="i",
        input_sha256="x",
        input_duration_s=10.0,
        sample_rate=44100,
        stems=stems,
        manifest_key="o/manifest.json",
        residual_db=residual,
        timings={},
        device="cpu",
        gpu_type=None,
        peak_memory_mb=1.0,
        gpu_peak_memory_mb=None,
        billed_seconds=1.0,
        segments=1,
        batches=1,
        engine_version="1",
    )


def test_check_figures_and_tolerances():
    frame = 1024 / 44100
    res = {
        (r.asset_key.to_user_string(), r.check_name): r
        for r in checks.evaluate("s", ["a", "b"], _manifest({"a": 10.0 + 0.9 * frame, "b": 10.0 + 1.5 * frame}))
    }
    assert res[("stems/s/a", "duration_matches_input")].passed  # within one AAC frame
    bad = res[("stems/s/b", "duration_matches_input")]
    assert not bad.passed and bad.metadata["difference_ms"].value == pytest.approx(1.5 * frame * 1000, abs=0.01)
    assert res[("stems/s/a", "set_reconstructs_mix")].passed
    flac = {
        (r.asset_key.to_user_string(), r.check_name): r
        for r in checks.evaluate("s", ["a"], _manifest({"a": 10.0 + 1 / 44100}, fmt="flac", residual=-12.0))
    }
    assert not flac[("stems/s/a", "duration_matches_input")].passed  # PCM: exact to the sample
    assert not flac[("stems/s/a", "set_reconstructs_mix")].passed
    assert flac[("stems/s/a", "set_reconstructs_mix")].metadata["residual_db"].value == -12.0
    silent = {
        (r.asset_key.to_user_string(), r.check_name): r
        for r in checks.evaluate("s", ["a"], _manifest({"a": 10.0}, peak=None, residual=None), -120.0)
    }
    assert silent[("stems/s/a", "set_not_all_silent")].passed  # a silent recording may give silent stems
    assert silent[("stems/s/a", "set_reconstructs_mix")].passed
    assert not silent[("stems/s/a", "audible")].passed


def test_markdown_preview_escapes_pipes():
    df = pd.DataFrame(
        [
            {
                "partition": "h4n/a|b",
                "strategy": "s",
                "state": "current",
                "reason": "x",
                "duration_s": 1.23456,
                "gpu_seconds": None,
                "cost_usd": 0.0,
            }
        ]
    )
    text = markdown_table(df)
    assert "h4n/a\\|b" in text and "1.235" in text and text.count("\n") == 2


def test_media_store_from_config_keeps_secrets_out_of_the_ui(tmp_path, seaweed):
    path = tmp_path / "config.yaml"
    path.write_text(
        "storage:\n  backend: s3\n  s3:\n"
        f"    endpoint_url: {seaweed.endpoint_url}\n    bucket: {seaweed.make_bucket()}\n    region: auto\n"
        "    access_key_id: ${TEST_KEY_ID}\n    secret_access_key: ${TEST_SECRET}\n"
    )
    env = {"TEST_KEY_ID": seaweed.access_key_id, "TEST_SECRET": seaweed.secret_access_key}
    config = load_config(path, env=env)
    resource = MediaStoreResource.from_config(config)
    assert resource.access_key_id == EnvVar("TEST_KEY_ID") and resource.secret_access_key == EnvVar("TEST_SECRET")
    ref = resource.storage_ref()
    assert ref.backend == "s3" and ref.bucket == config.storage.s3.bucket
    assert seaweed.secret_access_key not in repr(ref) and seaweed.access_key_id not in repr(ref)
    # The store it opens (dagster-aws S3Resource's client) works against the server.
    live = MediaStoreResource(
        backend="s3",
        endpoint_url=seaweed.endpoint_url,
        bucket=ref.bucket,
        access_key_id=seaweed.access_key_id,
        secret_access_key=seaweed.secret_access_key,
    )
    store = live.get_store()
    store.put_bytes("inputs/h4n/a b.wav", b"x" * 10)
    assert [i.key for i in store.list("inputs/")] == ["inputs/h4n/a b.wav"]
    assert live.playback_url("inputs/h4n/a b.wav").startswith(seaweed.endpoint_url)


def test_each_profile_job_runs_exactly_its_default_strategies(small_world: World):
    defs = build_definitions(small_world.config, resources=small_world.resources())
    # h4n runs htdemucs, memos runs htdemucs_6s: each profile's job selects only its own.
    memos = defs.resolve_job_def(process_job_name("memos"))
    assert {k.to_user_string() for k in memos.asset_layer.selected_asset_keys} == {
        "recording",
        *(f"stems/htdemucs_6s/{s}" for s in ("drums", "bass", "other", "vocals", "guitar", "piano")),
    }
    job = defs.resolve_job_def(process_job_name("h4n"))
    result = job.execute_in_process(partition_key="h4n/take3", instance=small_world.instance)
    assert result.success
    done = {
        k.to_user_string()
        for k in (ev.event_specific_data.materialization.asset_key for ev in result.get_asset_materialization_events())
    }
    assert done == {"recording", *(f"stems/htdemucs/{s}" for s in ("drums", "bass", "other", "vocals"))}


def test_definitions_module_builds_nothing_at_import(tmp_path):
    """Dagster's lazy form: importing the code location reads no config; calling ``defs()`` does."""
    env = dict(os.environ, STEMSET_CONFIG=str(tmp_path / "absent.yaml"))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import stemset_assets.definitions as d\n"
            "try:\n    d.defs()\nexcept Exception as err:\n    print(type(err).__name__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["ConfigError"]


def test_data_version_tags_are_dagsters_own():
    """The stem assets spell Dagster's version tag names out (Dagster does not export them); pin them."""
    from dagster._core.definitions import data_version

    from stemset_assets.defs.assets import stems

    assert stems.DATA_VERSION_TAG == data_version.DATA_VERSION_TAG
    assert stems.CODE_VERSION_TAG == data_version.CODE_VERSION_TAG


def test_definitions_load_without_torch_and_validate(tmp_path, model_repo):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG % {"repo": model_repo})
    env = dict(os.environ, STEMSET_CONFIG=str(config), DAGSTER_HOME=str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, stemset_assets.definitions as d; "
            "print(len(list(d.defs().resolve_asset_graph().get_all_asset_keys())), 'torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(1 + 4 + 4 + 6 + 6 + 1), "False"]
    dagster_cli = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster_cli), "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- several partitions per run


class CountingSeparator(SeparatorResource):
    """The local separator, counting how the stems asset calls it."""

    def separate_many(self, jobs, store):
        BATCHES.append([job.metadata["partition_key"] for job in jobs])
        return super().separate_many(jobs, store)


BATCHES: list[list[str]] = []


def test_a_backfill_run_separates_its_partitions_together_and_reports_each(tmp_path, model_repo):
    world = local_world(tmp_path, write_config(tmp_path / "cfg", model_repo))
    for i, name in enumerate(["a", "b", "c", "d"]):
        world.put_input(f"inputs/h4n/{name}.wav", music_like(1.0 + 0.25 * i, seed=i), 44100)
    assert list(world.register("h4n").values()) == ["h4n/a", "h4n/b", "h4n/c", "h4n/d"]
    for pk in ("h4n/a", "h4n/b", "h4n/d"):  # h4n/c gets no recording: its stems must fail alone
        assert materialize([recording], instance=world.instance, partition_key=pk, resources=world.resources()).success
    assert world.run("h4n/b", ["htdemucs"], with_recording=False).success  # b is current already

    stems = build_stems_asset(world.config, "htdemucs")
    assert stems.backfill_policy.max_partitions_per_run == world.config.backfill.max_partitions_per_run
    BATCHES.clear()
    result = materialize(
        [stems],
        instance=world.instance,
        raise_on_error=False,
        resources={"media_store": world.media, "separator": CountingSeparator()},
        tags={"dagster/asset_partition_range_start": "h4n/a", "dagster/asset_partition_range_end": "h4n/d"},
    )
    assert not result.success
    assert BATCHES == [["h4n/a", "h4n/d"]]  # one call for the two that needed separating
    text = failure_text(result)
    assert "1 of 4 partition(s) failed" in text and "h4n/c" in text and "recording" in text
    events = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    vocals = {m.partition: m for m in events if m.asset_key.to_user_string() == "stems/htdemucs/vocals"}
    assert sorted(vocals) == ["h4n/a", "h4n/b", "h4n/d"]
    assert meta(vocals["h4n/b"], "reused") is True and meta(vocals["h4n/a"], "reused") is False
    assert meta(vocals["h4n/d"], "duration_s") == pytest.approx(1.75, abs=0.01)
    fps = fingerprints(world.config)
    assert vocals["h4n/a"].tags["dagster/code_version"] == fps["htdemucs"]
    record = read_record(world.store, "h4n/d")
    assert vocals["h4n/d"].tags["dagster/data_version"] == data_version(record.sha256, fps["htdemucs"])
    checked = {(e.partition, e.check_name) for e in result.get_asset_check_evaluations()}
    assert ("h4n/d", "duration_matches_input") in checked and ("h4n/a", "set_reconstructs_mix") in checked
    assert not any(p == "h4n/c" for p, _ in checked)
    for pk in ("h4n/a", "h4n/d"):
        assert world.store.exists(manifest_key(pk, "htdemucs"))
    assert not world.store.exists(manifest_key("h4n/c", "htdemucs"))
    # the instance sees a materialisation per partition, each with its own metadata
    latest = world.instance.fetch_materializations(AssetKey(["stems", "htdemucs", "vocals"]), limit=10).records
    assert {r.asset_materialization.partition for r in latest} >= {"h4n/a", "h4n/d"}


def test_selecting_one_stem_makes_the_whole_set_and_reports_only_that_stem(small_world: World):
    from dagster import AssetSelection

    world, pk = small_world, "h4n/take3"
    assert materialize([recording], instance=world.instance, partition_key=pk, resources=world.resources()).success
    vocals = AssetKey(["stems", "htdemucs", "vocals"])
    result = materialize(
        [build_stems_asset(world.config, "htdemucs")],
        instance=world.instance,
        partition_key=pk,
        resources=world.resources(),
        selection=AssetSelection.assets(vocals),
    )
    assert result.success
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [vocals]
    assert {e.asset_key for e in result.get_asset_check_evaluations()} == {vocals}
    names = sorted(i.key.rsplit("/", 1)[1] for i in world.store.list(stems_prefix(pk, "htdemucs") + "/"))
    assert names == ["bass.flac", "drums.flac", "manifest.json", "other.flac", "vocals.flac"]

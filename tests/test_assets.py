"""The Dagster asset catalog end to end: recordings, every strategy's stems, checks and the catalog.

Materialises with ``dagster.materialize`` on a real ephemeral instance (dynamic partitions
added to it), on a local media folder and on the SeaweedFS bucket, with the tiny Demucs models
of ``tests/model_fixtures.py`` and 2-3 s inputs.
"""

import io
import json
import time

import pandas as pd
import pytest
import soundfile as sf
from dagster import (
    AssetKey,
)

from gpu_worker.audio.resample import resampled_length
from gpu_worker.job import SeparationResult
from stemset_assets.core.catalog import build_catalog
from stemset_assets.core.layout import manifest_key, read_record, source_key, stems_prefix
from stemset_assets.core.partition_keys import hashed_key
from stemset_assets.core.stemsets import data_version, fingerprints
from stemset_assets.defs.build import build_definitions
from tests.asset_world import (  # noqa: F401 - pytest fixtures
    HOSTILE,
    NAN_STRATEGY,
    World,
    check_results,
    failure_text,
    local_world,
    materializations,
    meta,
    model_repo_fixture,
    sha256,
    small_world_fixture,
    world_fixture,
    write_config,
)
from tests.audio_fixtures import music_like


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

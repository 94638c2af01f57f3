"""The asset catalog's checks, resources and definitions, and runs over several partitions at once:
the check figures and tolerances, secrets kept out of the UI, jobs per profile, definitions that
load without torch, and a backfill run that separates its partitions together.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    AssetKey,
    EnvVar,
    materialize,
)

from gpu_worker.job import SeparationResult, StemFile
from stemset_assets.config import load_config
from stemset_assets.core.catalog import markdown_table
from stemset_assets.core.layout import manifest_key, read_record, stems_prefix
from stemset_assets.core.stemsets import data_version, fingerprints
from stemset_assets.defs import checks
from stemset_assets.defs.assets.recording import recording
from stemset_assets.defs.assets.stems import build_stems_asset
from stemset_assets.defs.build import build_definitions, process_job_name
from stemset_assets.defs.resources import MediaStoreResource, SeparatorResource
from tests.asset_world import (  # noqa: F401 - pytest fixtures
    CONFIG,
    ROOT,
    World,
    failure_text,
    local_world,
    meta,
    model_repo_fixture,
    small_world_fixture,
    write_config,
)
from tests.audio_fixtures import music_like

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

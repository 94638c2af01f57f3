"""The separator resource's remote backends, driven from real Dagster materialisations:
``http`` against a real worker process on loopback, ``modal`` through the client's fan-out with
the Modal class run in-process (no Modal account here), and secrets kept out of the UI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import DagsterInstance, EnvVar, Failure, materialize

from gpu_worker.errors import AudioError
from gpu_worker.job import SeparationResult
from stemset_assets.config import load_config
from stemset_assets.core.layout import manifest_key
from stemset_assets.defs.assets.recording import recording
from stemset_assets.defs.assets.stems import build_stems_asset
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource, SeparatorResource
from stemset_assets.defs.resources.remote_separators import ModalSeparatorClient
from tests.asset_world import failure_text, s3_media
from tests.configs import tiny_config_yaml
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import WorkerProcess, aws_env, free_port, make_job, upload_input
from tests.test_remote_separators import local_factory

TOKEN = "remote-backend-token-3c9e1a"
GPU = """\
gpu:
  backend: http
  type: L4
  url: http://127.0.0.1:9
  token: ${GPU_WORKER_TOKEN:-}
"""


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def worker(seaweed, model_repo, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPU_WORKER_", "STEMSET_"))}
    env.update(
        aws_env(seaweed),
        GPU_WORKER_TOKEN=TOKEN,
        STEMSET_MODEL_REPO=str(model_repo),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        OMP_NUM_THREADS="2",
    )
    proc = WorkerProcess(
        port=free_port(), env=env, log_path=tmp_path_factory.mktemp("worker") / "log", args=["--gpu-type", "L4"]
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _run(config, media, separator, pk):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, [pk])
    return materialize(
        [recording, build_stems_asset(config, "htdemucs")],
        instance=instance,
        partition_key=pk,
        resources={"media_store": media, "separator": separator},
        raise_on_error=False,
    )


def test_http_backend_materialises_stems_on_the_worker_with_its_cost(tmp_path, seaweed, model_repo, worker):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config_yaml(model_repo, sections=GPU))
    config = load_config(config_path, env={})
    media = s3_media(seaweed)
    store = media.get_store()
    upload_input(store, "inputs/h4n/take.wav", 1.5, seed=4)
    separator = SeparatorResource(backend="http", url=worker.url, token=TOKEN, gpu_type="L4", price_per_hour=0.70)
    result = _run(config, media, separator, "h4n/take")
    assert result.success
    stems = {
        m.asset_key.to_user_string(): m.metadata
        for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
    }
    vocals = stems["stems/htdemucs/vocals"]
    # the worker ran on this CPU, so it reports no GPU; the price is the configured type's (L4)
    assert vocals["backend"].value == "http" and vocals["device"].value.startswith("cpu")
    assert vocals["price_per_hour"].value == pytest.approx(0.70)
    billed = vocals["billed_seconds"].value
    assert billed > 0
    assert vocals["cost_usd"].value == pytest.approx(billed * 0.70 / 3600, abs=1e-6)
    manifest = SeparationResult.from_json(store.get_bytes(manifest_key("h4n/take", "htdemucs")))
    assert manifest.backend == "http" and set(manifest.stems) == {"drums", "bass", "other", "vocals"}

    # a wrong token: the run fails saying so, and nothing is published for the new partition
    upload_input(store, "inputs/h4n/other.wav", 1.0, seed=5)
    bad = _run(config, media, SeparatorResource(backend="http", url=worker.url, token="wrong"), "h4n/other")
    assert not bad.success
    message = failure_text(bad)  # the Failure's description, as the UI shows it
    assert "token" in message.lower() and "wrong" not in message
    assert not store.exists(manifest_key("h4n/other", "htdemucs"))


def test_modal_backend_fans_out_with_map_and_keeps_order(monkeypatch, seaweed, model_repo):
    from tests.remote_fixtures import bucket_store

    for key, value in aws_env(seaweed).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(model_repo))
    store = bucket_store(seaweed)
    upload_input(store, "inputs/a.wav", 1.0, seed=1)
    upload_input(store, "inputs/b.wav", 1.0, seed=2)
    store.put_bytes("inputs/broken.wav", b"not audio" * 50)
    jobs = [
        make_job(store, key, model_repo, prefix=f"outputs/t/{i}")
        for i, key in enumerate(["inputs/a.wav", "inputs/broken.wav", "inputs/b.wav"])
    ]
    factory, method = local_factory()
    separator = SeparatorResource(backend="modal", gpu_type="A10G")
    separator._client = ModalSeparatorClient("stemset-gpu", cls_factory=factory)
    out = separator.separate_many(jobs, store)
    assert method.calls == 3
    assert [type(o).__name__ for o in out] == ["SeparationResult", "AudioError", "SeparationResult"]
    assert isinstance(out[1], AudioError)
    assert [o.input_key for o in (out[0], out[2])] == ["inputs/a.wav", "inputs/b.wav"]
    assert store.exists("outputs/t/0/manifest.json") and not store.exists("outputs/t/1/manifest.json")


def test_misconfigured_backends_fail_clearly(tmp_path):
    from gpu_worker.errors import StemsetError
    from gpu_worker.job import SeparationJob

    local = MediaStoreResource(backend="local", root=str(tmp_path))
    job = SeparationJob(
        job_id="j",
        input_key="a.flac",
        output_prefix="o",
        strategy_name="s",
        strategy={},
        fingerprint="f",
        storage=local.storage_ref(),
    )
    for backend, error, message in [
        ("modal", Failure, "storage.backend: s3"),  # Modal cannot see this disk
        ("http", StemsetError, "gpu.url"),  # no worker URL configured
        ("tpu", Failure, "local, modal, http"),
    ]:
        with pytest.raises(error, match=message):
            SeparatorResource(backend=backend).separate(job, local.get_store())


def test_from_config_keeps_the_worker_token_out_of_the_ui(tmp_path, model_repo, monkeypatch):
    monkeypatch.setenv("GPU_WORKER_TOKEN", TOKEN)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config_yaml(model_repo, sections=GPU))
    config = load_config(config_path)
    resource = SeparatorResource.from_config(config)
    assert resource.backend == "http" and resource.gpu_type == "L4" and resource.price_per_hour == 0.70
    assert isinstance(resource.token, EnvVar) and TOKEN not in repr(resource)

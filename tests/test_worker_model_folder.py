"""A remote worker (HTTP or Modal) loads models only from its own folder: loading a Demucs model
unpickles files, so a job may not point the worker at another path on its machine."""

from __future__ import annotations

import json

import pytest

from gpu_worker.errors import JobError
from gpu_worker.job import SeparationJob, StorageRef
from gpu_worker.remote import WarmWorker


def job(model_repo: str | None) -> SeparationJob:
    return SeparationJob(
        job_id="j1",
        input_key="take.wav",
        output_prefix="out/take",
        strategy_name="s",
        strategy={"model": "htdemucs", "outputs": {"vocals": "vocals"}},
        fingerprint="f" * 16,
        storage=StorageRef("s3", bucket="media"),
        output_format="flac",
        model_repo=model_repo,
    )


def test_a_job_naming_another_model_folder_is_refused(tmp_path):
    worker = WarmWorker(backend="http", model_repo=str(tmp_path / "models"), preload_models=())
    with pytest.raises(JobError) as caught:
        worker.prepare(job("/home/someone/else"))
    message = str(caught.value)
    assert "/home/someone/else" in message and "STEMSET_MODEL_REPO" in message
    # The refusal is a Stemset error, so the HTTP/Modal envelope reports it instead of retrying.
    envelope = json.loads(worker.handle_json(job("/tmp/x").to_json()))
    assert envelope["error"]["type"] == "JobError"


def test_a_job_without_a_folder_gets_the_workers_own(tmp_path):
    mine = str(tmp_path / "models")
    worker = WarmWorker(backend="modal", model_repo=mine, preload_models=())
    assert worker.prepare(job(None)).model_repo == mine
    assert worker.prepare(job(mine)).model_repo == mine  # naming the worker's own folder is fine
    # A worker on Demucs' download refuses any folder a job names.
    with pytest.raises(JobError):
        WarmWorker(backend="http", preload_models=()).prepare(job(mine))

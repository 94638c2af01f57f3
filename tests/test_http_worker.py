"""The HTTP worker end to end: `python -m gpu_worker.http_worker` in its own process on 127.0.0.1,
HttpSeparatorClient -> worker -> SeaweedFS -> manifest -> SeparationResult; idempotent job ids;
a worker killed mid-job leaves no published set and a retry on a restarted worker succeeds;
wrong tokens are refused; no serving on a public address without a token."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import soundfile as sf

from gpu_worker.errors import StorageError
from gpu_worker.http_worker import WorkerConfigError, check_bind, serve
from gpu_worker.job import SeparationResult
from stemset_assets.defs.resources.remote_separators import HttpSeparatorClient, WorkerAuthError, WorkerUnreachableError
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import (
    FOUR_STEMS,
    ROOT,
    WorkerProcess,
    aws_env,
    bucket_store,
    free_port,
    make_job,
    published_keys,
    upload_input,
)

TOKEN = "test-token-7f3a9c1e5b2d4f6a8c0e"


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def worker_env(seaweed, model_repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPU_WORKER_", "STEMSET_"))}
    env.update(
        aws_env(seaweed),
        GPU_WORKER_TOKEN=TOKEN,
        STEMSET_MODEL_REPO=str(model_repo),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="2",
    )
    return env


@pytest.fixture(scope="module")
def worker(worker_env, tmp_path_factory):
    proc = WorkerProcess(
        port=free_port(),
        env=worker_env,
        log_path=tmp_path_factory.mktemp("worker") / "log",
        args=["--preload", "htdemucs", "--gpu-type", "L4"],
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def store(seaweed):
    return bucket_store(seaweed)


def test_separate_end_to_end(worker, store, tmp_path):
    upload_input(store, "inputs/test/take1.wav", 1.5, seed=3)
    job = make_job(store, "inputs/test/take1.wav", None)
    client = HttpSeparatorClient(worker.url, TOKEN, timeout_s=120, poll_s=0.2)
    result = client.separate(job)

    assert result.backend == "http" and result.job_id == job.job_id
    assert sorted(result.stems) == ["bass", "drums", "other", "vocals"]
    assert result.gpu_type is None  # no CUDA here, so no GPU to bill
    assert result.timings["startup"] > 0  # the preload was charged to the first job
    # Billed: the device time the job held (alone on the worker: from its arrival to its manifest).
    assert result.billed_seconds == pytest.approx(result.timings["held"] + result.timings["startup"], abs=2e-3)
    assert result.timings["held"] >= result.timings["total"] - 2e-3
    assert SeparationResult.from_json(store.get_bytes(result.manifest_key)) == result
    for name, stem in result.stems.items():
        local = tmp_path / f"{name}.flac"
        store.download(stem.key, local)
        data, sr = sf.read(str(local), always_2d=True)
        assert sr == 44100 and data.shape == (round(1.5 * 44100), 2)

    # The same job id again: the existing job, not a second run (identical timings prove it).
    auth = {"Authorization": f"Bearer {TOKEN}"}
    again = httpx.post(worker.url + "/jobs", content=job.to_json(), headers=auth, timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "complete"
    assert again.json()["result"] == result.to_dict()
    assert client.separate(job) == result
    health = httpx.get(worker.url + "/healthz", timeout=10).json()
    assert health["ok"] is True and health["jobs"]["complete"] == 1

    # Same id, different payload: refused, not silently answered with the old result.
    conflicting = make_job(store, "inputs/test/take1.wav", None, job_id=job.job_id, output_format="wav")
    conflict = httpx.post(worker.url + "/jobs", content=conflicting.to_json(), headers=auth, timeout=10)
    assert conflict.status_code == 409 and "different payload" in conflict.json()["error"]["message"]


def test_worker_errors_surface_verbatim(worker, store):
    job = make_job(store, "inputs/test/not-there.wav", None)
    client = HttpSeparatorClient(worker.url, TOKEN, timeout_s=60, poll_s=0.1)
    with pytest.raises(StorageError) as caught:
        client.separate(job)
    state = httpx.get(
        f"{worker.url}/jobs/{job.job_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).json()
    assert state["status"] == "error" and state["error"]["type"] == "StorageError"
    assert str(caught.value) == state["error"]["message"]
    assert "not-there.wav" in str(caught.value)

    bad = httpx.post(
        worker.url + "/jobs", content=b'{"job_id": 1}', headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "JobError"


def test_wrong_token_is_refused(worker, store):
    job = make_job(store, "inputs/test/whatever.wav", None)
    wrong = "not-the-token-0123456789"
    client = HttpSeparatorClient(worker.url, wrong, timeout_s=30, poll_s=0.1)
    with pytest.raises(WorkerAuthError) as caught:
        client.separate(job)
    message = str(caught.value)
    assert "rejected the token" in message and "GPU_WORKER_TOKEN" in message
    assert wrong not in message and TOKEN not in message and wrong not in repr(client)

    missing = httpx.post(worker.url + "/jobs", content=job.to_json(), timeout=10)
    assert missing.status_code == 401 and "missing" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    denied = httpx.get(f"{worker.url}/jobs/{job.job_id}", headers={"Authorization": f"Bearer {wrong}"}, timeout=10)
    assert denied.status_code == 401 and wrong not in denied.text and TOKEN not in denied.text


def test_killed_mid_job_then_retry_on_restarted_worker(worker_env, store, tmp_path):
    port = free_port()
    first = WorkerProcess(port=port, env=worker_env, log_path=tmp_path / "first.log").start()
    second = WorkerProcess(port=port, env=worker_env, log_path=tmp_path / "second.log")
    try:
        upload_input(store, "inputs/test/long take.wav", 5.0, seed=4)
        # One segment per batch: progress moves segment by segment, so we catch it mid-run.
        slow = dict(FOUR_STEMS, __params={"shifts": 1, "overlap": 0.25, "batch_size": 1})
        job = make_job(store, "inputs/test/long take.wav", None, strategy=slow)
        client = HttpSeparatorClient(first.url, TOKEN, timeout_s=120, poll_s=0.05, retries=2, backoff_s=0.1)
        outcome: dict[str, object] = {}

        def call():
            try:
                outcome["result"] = client.separate(job)
            except Exception as err:  # noqa: BLE001 - inspected below
                outcome["error"] = err

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 60
        state = {}
        while time.monotonic() < deadline:  # wait until the model is running on segments
            response = httpx.get(f"{first.url}/jobs/{job.job_id}", headers=auth, timeout=5)
            state = response.json() if response.status_code == 200 else {}
            if state.get("status") == "running" and state.get("progress", 0) > 0:
                break
            assert state.get("status") not in ("complete", "error"), state
            time.sleep(0.02)
        else:
            pytest.fail(f"the job never ran: {state}")
        first.kill()

        thread.join(timeout=30)
        assert not thread.is_alive()
        err = outcome.get("error")
        assert isinstance(err, WorkerUnreachableError), outcome
        assert first.url in str(err) and job.job_id in str(err) and "run it again" in str(err)
        assert published_keys(store, job.output_prefix) == []  # no manifest, no final stems

        second.start()
        result = client.separate(job)  # the same job id on the restarted worker
        assert result.job_id == job.job_id
        assert SeparationResult.from_json(store.get_bytes(result.manifest_key)) == result
        assert published_keys(store, job.output_prefix) == sorted(
            [s.key for s in result.stems.values()] + [result.manifest_key]
        )
    finally:
        first.kill()
        second.stop()


def test_refuses_public_address_without_token(worker_env, tmp_path):
    with pytest.raises(WorkerConfigError, match="Refusing to serve on 0.0.0.0 without a token"):
        serve(host="0.0.0.0", port=free_port(), token=None)
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "a-token")
    with pytest.raises(WorkerConfigError):
        check_bind("192.0.2.10", "")

    env = {k: v for k, v in worker_env.items() if k != "GPU_WORKER_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "gpu_worker.http_worker", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: Refusing to serve on 0.0.0.0 without a token")
    assert "GPU_WORKER_TOKEN" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------- hostile input (issue 14, item 7)


class _RecordingRunner:
    """Takes jobs without running them (the routes are under test, not separation)."""

    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)
        record = type("Record", (), {"to_dict": lambda self: {"job_id": job.job_id, "status": "queued"}})()
        return record, True

    def stats(self):
        return {}

    def shutdown(self):
        pass


def _post_streamed(app, body_chunks, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int]:
    """POST /jobs straight into the ASGI app, the body fed chunk by chunk; (status, JSON answer,
    body bytes the app consumed)."""
    import asyncio
    import json

    consumed = 0
    sent: list[dict] = []
    chunks = iter(body_chunks)

    async def receive():
        nonlocal consumed
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/jobs",
        "raw_path": b"/jobs",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {TOKEN}".encode()), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), consumed


def test_an_oversize_body_stops_being_read_at_the_limit_with_flat_memory():
    import tracemalloc

    from gpu_worker.http_worker import MAX_BODY_BYTES, create_app

    app = create_app(runner=_RecordingRunner(), token=TOKEN)
    block = b"x" * (64 * 1024)
    total = 400 * 1024 * 1024  # 400 MB if it were all read

    def body():
        for _ in range(total // len(block)):
            yield block

    # Chunked (no Content-Length): the app reads up to the limit, then answers 413 and stops.
    tracemalloc.start()
    status, answer, consumed = _post_streamed(app, body(), [])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert status == 413 and answer["error"]["type"] == "JobError", answer
    assert consumed <= MAX_BODY_BYTES + len(block), consumed  # not 400 MB
    assert peak < 8 * MAX_BODY_BYTES, peak  # memory stays flat (a few MiB, not 0.4 GB)

    # A declared length over the limit is refused before a byte of the body is read.
    status, answer, consumed = _post_streamed(app, body(), [(b"content-length", str(total).encode())])
    assert status == 413 and consumed == 0 and str(total) in answer["error"]["message"]


def test_local_storage_roots_are_allowed_by_configuration_only(worker, store, tmp_path):
    from starlette.testclient import TestClient

    from gpu_worker.http_worker import LOCAL_ROOTS_ENV, create_app, local_roots_from_env
    from gpu_worker.job import SeparationJob, StorageRef

    auth = {"Authorization": f"Bearer {TOKEN}"}
    s3_job = make_job(store, "inputs/test/any.wav", None)
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()

    def local(root, out=None) -> SeparationJob:
        fields = {"storage": StorageRef("local", root=str(root))}
        if out is not None:
            fields["output_storage"] = StorageRef("local", root=str(out))
        return dataclasses.replace(s3_job, job_id=uuid.uuid4().hex[:12], **fields)

    # The real worker (started with no allowed root) refuses every local root a job names.
    for job in (local(secret_dir), local("/"), local("relative/media")):
        resp = httpx.post(f"{worker.url}/jobs", content=job.to_json(), headers=auth, timeout=10)
        assert resp.status_code == 403, resp.text
        assert "does not serve local storage" in resp.json()["error"]["message"]
    assert list(secret_dir.iterdir()) == []

    # Allowed roots (and folders under them) are taken; anything else, or escaping by '..', is not.
    allowed = tmp_path / "media"
    (allowed / "sub").mkdir(parents=True)
    runner = _RecordingRunner()
    with TestClient(create_app(runner=runner, token=TOKEN, local_roots=[allowed])) as client:
        for root, status in [
            (allowed, 202),
            (allowed / "sub", 202),
            (allowed / ".." / "elsewhere", 403),
            (secret_dir, 403),
        ]:
            resp = client.post("/jobs", content=local(root).to_json(), headers=auth)
            assert resp.status_code == status, (root, resp.text)
        # An allowed input root does not allow another output root.
        resp = client.post("/jobs", content=local(allowed, out=secret_dir).to_json(), headers=auth)
        assert resp.status_code == 403, resp.text
    assert len(runner.jobs) == 2
    assert local_roots_from_env(f"{allowed}{os.pathsep}{secret_dir}") == [allowed, secret_dir]
    assert LOCAL_ROOTS_ENV == "STEMSET_WORKER_LOCAL_ROOTS"

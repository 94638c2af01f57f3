"""Client backends: ModalSeparatorClient with the Separator class's `.local()` standing in for
`.remote`/`.map` (per-item errors keep their place), clear errors when Modal is not deployed or
not logged in; HttpSeparatorClient's retries, timeouts and token handling against a scripted
local server; and the cost helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_worker.errors import AudioError, StorageError
from gpu_worker.job import SeparationJob, SeparationResult, StorageRef
from stemset_assets.core.cost import cost_usd, price_per_hour_for
from stemset_assets.defs.resources.remote_separators import (
    HttpSeparatorClient,
    ModalAuthError,
    ModalNotDeployedError,
    ModalSeparatorClient,
    RemoteSeparatorError,
    WorkerAuthError,
    WorkerTimeoutError,
    WorkerUnreachableError,
)
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import ROOT, aws_env, bucket_store, make_job, published_keys, upload_input


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


# --------------------------------------------------------------------------------------
# Modal, with .local() standing in for .remote and .map
# --------------------------------------------------------------------------------------


class LocalMethod:
    """``.remote`` and ``.map`` of a Modal method, run in this process through ``.local()``."""

    def __init__(self, method, fail_inputs: dict[int, Exception] | None = None):
        self._method = method
        self._fail = fail_inputs or {}
        self.calls = 0

    def remote(self, job_json: str) -> str:
        self.calls += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._method.local(job_json)

    def map(self, inputs, return_exceptions: bool = False):
        for i, item in enumerate(inputs):
            try:
                if i in self._fail:
                    raise self._fail[i]  # what Modal hands back for an input whose container died
                yield self.remote(item)
            except Exception as err:
                if not return_exceptions:
                    raise
                yield err


def local_factory(fail_inputs=None):
    from gpu_worker.modal_app import Separator

    instance = Separator()
    method = LocalMethod(instance.separate, fail_inputs)

    class Handle:
        separate = method

    return (lambda: lambda: Handle()), method


@pytest.fixture
def modal_env(monkeypatch, seaweed, model_repo):
    for key in list(os.environ):
        if key.startswith("AWS_") or key == "MODAL_TASK_ID":
            monkeypatch.delenv(key)
    for key, value in aws_env(seaweed).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(model_repo))
    monkeypatch.setenv("STEMSET_PRELOAD_MODELS", "htdemucs")


def test_modal_client_separate_and_map_keep_order(modal_env, seaweed):
    import modal.exception

    store = bucket_store(seaweed)
    upload_input(store, "inputs/test/a.wav", 1.0, seed=5)
    upload_input(store, "inputs/test/c.wav", 1.0, seed=6)
    store.put_bytes("inputs/test/lyrics.wav", b"these are lyrics, not audio\n" * 20)
    jobs = [
        make_job(store, "inputs/test/a.wav", None),
        make_job(store, "inputs/test/lyrics.wav", None),
        make_job(store, "inputs/test/c.wav", None),
        make_job(store, "inputs/test/a.wav", None, prefix="outputs/test/a/crashed"),
    ]
    factory, method = local_factory(fail_inputs={3: modal.exception.InternalFailure("container crashed")})
    client = ModalSeparatorClient("stemset-gpu", cls_factory=factory)

    results = client.separate_many(jobs)
    assert len(results) == 4
    assert isinstance(results[0], SeparationResult) and results[0].job_id == jobs[0].job_id
    assert isinstance(results[1], AudioError) and "lyrics.wav" in str(results[1])
    assert isinstance(results[2], SeparationResult) and results[2].job_id == jobs[2].job_id
    assert isinstance(results[3], RemoteSeparatorError) and "container crashed" in str(results[3])
    assert "modal app logs stemset-gpu" in str(results[3])
    assert results[0].backend == "modal" and "startup" in results[0].timings  # first call of the container
    assert "startup" not in results[2].timings
    for job, result in zip(jobs, results, strict=True):
        keys = published_keys(store, job.output_prefix)
        if isinstance(result, SeparationResult):
            assert SeparationResult.from_json(store.get_bytes(result.manifest_key)) == result
        else:
            assert keys == []

    single = client.separate(jobs[0])  # .remote: same job again, a fresh run publishing the same set
    assert single.job_id == jobs[0].job_id and sorted(single.stems) == sorted(results[0].stems)
    with pytest.raises(StorageError, match="missing.wav"):
        client.separate(make_job(store, "inputs/test/missing.wav", None))
    assert client.separate_many([]) == []


def _raising_factory(exc):
    class Method:
        def remote(self, _):
            raise exc

        def map(self, _inputs, return_exceptions=False):
            raise exc

    class Handle:
        separate = Method()

    return lambda: lambda: Handle()


def _job():
    return SeparationJob(
        job_id="j1",
        input_key="inputs/h4n/a.wav",
        output_prefix="outputs/h4n/a/htdemucs",
        strategy_name="htdemucs",
        strategy={"_": "htdemucs", "vocals": "vocals"},
        fingerprint="fp",
        storage=StorageRef("s3", bucket="b"),
    )


def test_modal_client_not_deployed():
    import modal.exception

    exc = modal.exception.NotFoundError("Lookup failed for Cls 'Separator' from the 'stemset-gpu' app.")
    client = ModalSeparatorClient("stemset-gpu", cls_factory=_raising_factory(exc))
    for call in (lambda: client.separate(_job()), lambda: client.separate_many([_job()])):
        with pytest.raises(ModalNotDeployedError) as caught:
            call()
        assert "modal deploy gpu_worker/modal_app.py" in str(caught.value)
        assert "stemset-gpu" in str(caught.value)


def test_modal_client_without_token_says_how_to_log_in(tmp_path):
    """The real lookup path with no Modal token: a clear error, no network needed."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), MODAL_SERVER_URL="http://127.0.0.1:9")
    code = textwrap.dedent("""
        from gpu_worker.job import SeparationJob, StorageRef
        from stemset_assets.defs.resources.remote_separators import ModalSeparatorClient, ModalAuthError
        job = SeparationJob(job_id="j1", input_key="a.wav", output_prefix="o", strategy_name="s",
                            strategy={"_": "htdemucs", "vocals": "vocals"}, fingerprint="fp",
                            storage=StorageRef("s3", bucket="b"))
        try:
            ModalSeparatorClient("stemset-gpu").separate(job)
        except ModalAuthError as err:
            print("AUTH:", err)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "AUTH:" in out.stdout and "modal token new" in out.stdout
    assert issubclass(ModalAuthError, RemoteSeparatorError)


# --------------------------------------------------------------------------------------
# HTTP client against a scripted server
# --------------------------------------------------------------------------------------


class Script:
    """Answers for the fake worker: a list of (status, body) per route, the last one repeating."""

    def __init__(self, routes):
        self.routes = {k: list(v) for k, v in routes.items()}
        self.seen: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def answer(self, method, path, auth):
        with self.lock:
            self.seen.append((method, path, auth))
            key = f"{method} {path.split('/')[1] if path.count('/') > 1 else path}"
            queue = self.routes.get(key) or self.routes.get(f"{method} {path}") or [(404, {"error": {}})]
            return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def fake_worker():
    servers = []

    def start(routes):
        script = Script(routes)

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = script.answer(self.command, self.path, self.headers.get("authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _result_dict(job):
    return {
        "job_id": job.job_id,
        "strategy_name": job.strategy_name,
        "fingerprint": job.fingerprint,
        "input_key": job.input_key,
        "input_sha256": "0" * 64,
        "input_duration_s": 1.0,
        "sample_rate": 44100,
        "stems": {},
        "manifest_key": "m",
        "residual_db": None,
        "timings": {"total": 30.0},
        "device": "GPU",
        "gpu_type": "A100-40GB",
        "peak_memory_mb": 1.0,
        "gpu_peak_memory_mb": None,
        "billed_seconds": 30.0,
        "segments": 1,
        "batches": 1,
        "engine_version": "1",
        "backend": "http",
        "reused": False,
        "version": 1,
    }


def test_http_client_retries_5xx_and_resubmits_forgotten_jobs(fake_worker):
    job = _job()
    url, script = fake_worker(
        {
            "POST /jobs": [
                (503, {"error": {"type": "WorkerError", "message": "warming up"}}),
                (502, {}),
                (202, {"job_id": "j1", "status": "queued"}),
            ],
            "GET jobs": [
                (200, {"job_id": "j1", "status": "running"}),
                (404, {"error": {"type": "NotFound", "message": "unknown job"}}),
                (200, {"job_id": "j1", "status": "complete", "result": _result_dict(job)}),
            ],
        }
    )
    client = HttpSeparatorClient(url, "tok-abcdef-123456", timeout_s=20, poll_s=0.01, retries=3, backoff_s=0.01)
    result = client.separate(job)
    assert result.job_id == "j1" and result.billed_seconds == 30.0
    methods = [m for m, _, _ in script.seen]
    assert methods == ["POST", "POST", "POST", "GET", "GET", "POST", "GET"]  # 2 retries, 1 resubmission
    assert all(auth == "Bearer tok-abcdef-123456" for _, _, auth in script.seen)


def test_http_client_gives_up_after_retries(fake_worker):
    url, script = fake_worker({"POST /jobs": [(500, {"error": {"message": "boom"}})]})
    client = HttpSeparatorClient(url, "tok", timeout_s=20, poll_s=0.01, retries=2, backoff_s=0.01)
    with pytest.raises(WorkerUnreachableError, match="failed 3 time"):
        client.separate(_job())
    assert len(script.seen) == 3

    dead = HttpSeparatorClient(f"http://127.0.0.1:{_closed_port()}", "tok", retries=1, backoff_s=0.01)
    with pytest.raises(WorkerUnreachableError, match="ConnectionRefused"):
        dead.separate(_job())


def _closed_port() -> int:
    from tests.remote_fixtures import free_port

    return free_port()


def test_http_client_timeout_and_errors(fake_worker):
    url, _ = fake_worker(
        {
            "POST /jobs": [(202, {"job_id": "j1", "status": "queued"})],
            "GET jobs": [(200, {"job_id": "j1", "status": "running"})],
        }
    )
    client = HttpSeparatorClient(url, "tok", timeout_s=0.5, poll_s=0.05)
    with pytest.raises(WorkerTimeoutError, match="within 0.5 s"):
        client.separate(_job())

    url, _ = fake_worker(
        {
            "POST /jobs": [(202, {"job_id": "j1", "status": "queued"})],
            "GET jobs": [
                (
                    200,
                    {
                        "job_id": "j1",
                        "status": "error",
                        "error": {"type": "AudioError", "message": "a.wav: not audio. Hint."},
                    },
                )
            ],
        }
    )
    with pytest.raises(AudioError) as caught:
        HttpSeparatorClient(url, "tok", poll_s=0.01).separate(_job())
    assert str(caught.value) == "a.wav: not audio. Hint."

    secret = "very-secret-token-value-42"
    url, _ = fake_worker({"POST /jobs": [(401, {"error": {"type": "AuthError", "message": "no"}})]})
    client = HttpSeparatorClient(url, secret)
    with pytest.raises(WorkerAuthError) as caught:
        client.separate(_job())
    assert "rejected the token" in str(caught.value)
    assert secret not in str(caught.value) and secret not in repr(client)
    with pytest.raises(RemoteSeparatorError, match="user name or password") as caught:
        HttpSeparatorClient(url.replace("http://", "http://user:hunter2pw@"), secret)
    assert "hunter2pw" not in str(caught.value)

    with pytest.raises(RemoteSeparatorError, match="gpu.url"):
        HttpSeparatorClient("", "tok")
    with pytest.raises(RemoteSeparatorError, match="not an http"):
        HttpSeparatorClient("ftp://host/", "tok")


# --------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------


def test_cost_from_worker_clock():
    from stemset_assets.config import GpuConfig

    result = SeparationResult.from_dict(_result_dict(_job()) | {"backend": "modal"})
    assert cost_usd(result, 2.50) == pytest.approx(0.020833, abs=1e-6)  # 30 s on an A100-40GB
    assert cost_usd(result.to_dict(), 0.59) == pytest.approx(30 * 0.59 / 3600, abs=1e-6)
    assert cost_usd(SeparationResult.from_dict(_result_dict(_job()) | {"backend": "local"}), 2.50) == 0.0
    gpu = GpuConfig()
    assert price_per_hour_for(result, gpu) == 2.50
    assert price_per_hour_for(SeparationResult.from_dict(_result_dict(_job()) | {"gpu_type": "T4"}), gpu) == 0.59
    assert price_per_hour_for(SeparationResult.from_dict(_result_dict(_job()) | {"gpu_type": None}), gpu) == 2.50

"""The Modal app: importable anywhere, the Separator class end to end through `.local()` (enter
hooks + separate) against SeaweedFS with tiny models, the web endpoint's spawn/poll logic, and
the secret set-up script (with a fake `modal` on PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.errors import StorageError
from gpu_worker.job import SeparationResult
from gpu_worker.remote import SpawnJobRunner, decode_response
from tests.model_fixtures import make_model_repo
from tests.remote_fixtures import ROOT, aws_env, bucket_store, make_job, published_keys, upload_input

CLEAN_ENV_DROP = ("MODAL_", "AWS_", "STEMSET_", "GPU_WORKER_")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_DROP)}
    env.update(
        HOME=str(home),
        PYTHONPATH=str(ROOT),
        # Any attempt to reach Modal would hit a closed local port and fail.
        MODAL_SERVER_URL="http://127.0.0.1:9",
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


class MemoryIndex:  # test-only: moved out of gpu_worker.remote
    """A process-local stand-in for the ``modal.Dict`` a :class:`SpawnJobRunner` keeps job ids in."""

    def __init__(self):
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(key, default)

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        with self._lock:
            if skip_if_exists and key in self._data:
                return False
            self._data[key] = value
            return True

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------


def test_imports_without_token_or_network(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent("""
        import json, sys
        import gpu_worker.modal_app as m
        print(json.dumps({"app": m.app.name, "gpu": m.GPU_TYPE, "torch": "torch" in sys.modules,
                          "classes": sorted(m.app.registered_classes), "functions": sorted(m.app.registered_functions)}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(home), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["app"] == "stemset-gpu" and info["gpu"] == "A100-40GB"
    assert info["torch"] is False  # the deploy machine needs no torch import
    assert "Separator" in info["classes"] and "web" in info["functions"]
    assert not list(home.iterdir())  # no token file was written

    custom = subprocess.run(
        [sys.executable, "-c", "import gpu_worker.modal_app as m; print(m.app.name, m.GPU_TYPE)"],
        cwd=tmp_path,
        env=clean_env(home, STEMSET_MODAL_APP="stemset-test", STEMSET_GPU_TYPE="T4"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert custom.returncode == 0, custom.stderr
    assert custom.stdout.split() == ["stemset-test", "T4"]


def test_script_path_import_does_not_shadow_stdlib_http(tmp_path):
    """`modal deploy gpu_worker/modal_app.py` puts gpu_worker/ on sys.path: no module there may
    take a standard library name (the HTTP worker is http_worker.py, not http.py)."""
    shadowing = sorted(p.stem for p in (ROOT / "gpu_worker").iterdir() if p.stem in sys.stdlib_module_names)
    assert not shadowing
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT / "gpu_worker")!r})
        spec = importlib.util.spec_from_file_location("modal_app", {str(ROOT / "gpu_worker" / "modal_app.py")!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["modal_app"] = module
        spec.loader.exec_module(module)
        import http.client, urllib.request
        assert "gpu_worker" not in (http.__file__ or ""), http.__file__
        print(module.app.name)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(home), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stemset-gpu"


# --------------------------------------------------------------------------------------
# The Separator class through .local()
# --------------------------------------------------------------------------------------


@pytest.fixture
def modal_env(monkeypatch, seaweed, model_repo):
    for key in list(os.environ):
        if key.startswith(("AWS_", "MODAL_TASK_ID")):
            monkeypatch.delenv(key)
    for key, value in aws_env(seaweed).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STEMSET_MODEL_REPO", str(model_repo))
    monkeypatch.setenv("STEMSET_PRELOAD_MODELS", "htdemucs")
    monkeypatch.setenv("STEMSET_GPU_TYPE", "A100-40GB")


def test_separator_local_end_to_end(modal_env, seaweed):
    from gpu_worker.modal_app import Separator

    store = bucket_store(seaweed)
    upload_input(store, "inputs/test/take one.wav", 1.5, seed=1)
    upload_input(store, "inputs/test/take2.wav", 1.0, seed=2)
    # No endpoint in the job: the worker takes STEMSET_S3_ENDPOINT_URL from the r2-secret.
    job = make_job(store, "inputs/test/take one.wav", None, with_endpoint=False)
    job2 = make_job(store, "inputs/test/take2.wav", None, with_endpoint=False)
    assert job.storage.endpoint_url in (None, "")

    separator = Separator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally ... no access to the mounted Volume"
        first = SeparationResult.from_json(separator.separate.local(job.to_json()))
        second = SeparationResult.from_json(separator.separate.local(job2.to_json()))

    assert first.backend == "modal" and first.job_id == job.job_id
    assert sorted(first.stems) == ["bass", "drums", "other", "vocals"]
    # The first call of a container pays for the enter hooks (model load); the second does not.
    assert first.timings["startup"] > 0
    # Billed: the device time the job held (alone on the worker: from its arrival to its manifest).
    assert first.billed_seconds == pytest.approx(first.timings["held"] + first.timings["startup"], abs=2e-3)
    assert first.timings["held"] >= first.timings["total"] - 2e-3
    assert "startup" not in second.timings
    assert second.billed_seconds == pytest.approx(second.timings["held"], abs=2e-3)
    assert second.timings["held"] >= second.timings["total"] - 2e-3
    # No CUDA here: the result names no GPU type (nothing to price as a GPU).
    assert first.gpu_type is None and first.device.lower().startswith(("cpu", "x86", "arm", "aarch"))

    manifest = SeparationResult.from_json(store.get_bytes(first.manifest_key))
    assert manifest == first
    assert published_keys(store, job.output_prefix) == sorted(
        [s.key for s in first.stems.values()] + [first.manifest_key]
    )
    for stem in first.stems.values():
        assert stem.duration_s == pytest.approx(1.5, abs=1e-3)


def test_separator_answers_job_errors_with_an_envelope(modal_env, seaweed):
    from gpu_worker.modal_app import Separator

    store = bucket_store(seaweed)
    job = make_job(store, "inputs/test/missing.wav", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answer = Separator().separate.local(job.to_json())
    data = json.loads(answer)
    assert data["error"]["type"] == "StorageError" and data["job_id"] == job.job_id
    with pytest.raises(StorageError, match="missing.wav"):
        decode_response(answer)
    assert published_keys(store, job.output_prefix) == []


# --------------------------------------------------------------------------------------
# The web endpoint's logic: spawn at once, poll by call id, idempotent by job id
# --------------------------------------------------------------------------------------


def _fake_result(job) -> str:
    return json.dumps(
        {
            "job_id": job.job_id,
            "strategy_name": job.strategy_name,
            "fingerprint": job.fingerprint,
            "input_key": job.input_key,
            "input_sha256": "0" * 64,
            "input_duration_s": 1.0,
            "sample_rate": 44100,
            "stems": {},
            "manifest_key": f"{job.output_prefix}/manifest.json",
            "residual_db": None,
            "timings": {"total": 1.0},
            "device": "NVIDIA A100",
            "gpu_type": "A100-40GB",
            "peak_memory_mb": 1.0,
            "gpu_peak_memory_mb": 1.0,
            "billed_seconds": 1.0,
            "segments": 1,
            "batches": 1,
            "engine_version": "1",
            "backend": "modal",
            "reused": False,
            "version": 1,
        }
    )


class FakeModal:
    """spawn/poll/cancel over an in-memory table, like Separator.separate.spawn + FunctionCall.get."""

    def __init__(self):
        self.calls: dict[str, dict] = {}

    def spawn(self, job_json: str) -> str:
        call_id = f"fc-{len(self.calls) + 1}"
        self.calls[call_id] = {"job": job_json, "polls": 0, "answer": None}
        return call_id

    def finish(self, call_id: str, answer: str | None = None) -> None:
        from gpu_worker.job import SeparationJob

        job = SeparationJob.from_json(self.calls[call_id]["job"])
        self.calls[call_id]["answer"] = answer or _fake_result(job)

    def poll(self, call_id: str):
        call = self.calls[call_id]
        call["polls"] += 1
        if call.get("expired"):
            return "expired", None
        return ("complete", call["answer"]) if call["answer"] else ("pending", None)

    def cancel(self, call_id: str) -> None:
        self.calls[call_id]["cancelled"] = True


def test_web_endpoint_spawns_and_polls(tmp_path):
    from starlette.testclient import TestClient

    from gpu_worker.http_worker import create_app
    from gpu_worker.job import SeparationJob, StorageRef

    fake = FakeModal()
    runner = SpawnJobRunner(spawn=fake.spawn, poll=fake.poll, index=MemoryIndex(), cancel=fake.cancel)
    job = SeparationJob(
        job_id="job-1",
        input_key="inputs/h4n/a.wav",
        output_prefix="outputs/h4n/a/htdemucs",
        strategy_name="htdemucs",
        strategy={"_": "htdemucs", "vocals": "vocals"},
        fingerprint="fp",
        storage=StorageRef("s3", bucket="b"),
    )

    # A public endpoint without a configured token accepts no jobs.
    with TestClient(create_app(runner=runner, token=None, require_token=True)) as client:
        refused = client.post("/", content=job.to_json())
        assert refused.status_code == 503 and "GPU_WORKER_TOKEN" in refused.json()["error"]["message"]
        assert client.get("/healthz").json()["ok"] is True
    assert fake.calls == {}

    auth = {"Authorization": "Bearer s3cret-token-for-tests"}
    with TestClient(create_app(runner=runner, token="s3cret-token-for-tests", require_token=True)) as client:
        assert client.post("/", content=job.to_json()).status_code == 401
        accepted = client.post("/", content=job.to_json(), headers=auth)
        assert accepted.status_code == 202
        body = accepted.json()
        assert body["accepted"] is True and body["call_id"] == "fc-1" and body["job_id"] == "job-1"
        assert client.get("/result/fc-1", headers=auth).json()["status"] == "pending"
        assert client.get("/jobs/job-1", headers=auth).json()["status"] == "running"

        again = client.post("/jobs", content=job.to_json(), headers=auth)  # same job id: no second spawn
        assert again.status_code == 200 and again.json()["call_id"] == "fc-1"
        assert list(fake.calls) == ["fc-1"]
        changed = SeparationJob.from_dict({**json.loads(job.to_json()), "output_format": "wav"})
        conflict = client.post("/jobs", content=changed.to_json(), headers=auth)
        assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "JobConflictError"

        fake.finish("fc-1")
        done = client.get("/result/fc-1", headers=auth).json()
        assert done["status"] == "complete" and done["result"]["job_id"] == "job-1"
        assert client.get("/jobs/job-1", headers=auth).json()["status"] == "complete"

        # A job error travels as an envelope and is reported as an error, message verbatim.
        job2 = SeparationJob.from_dict({**json.loads(job.to_json()), "job_id": "job-2"})
        call2 = client.post("/", content=job2.to_json(), headers=auth).json()["call_id"]
        fake.finish(call2, json.dumps({"error": {"type": "AudioError", "message": "a.wav is not audio."}}))
        failed = client.get(f"/result/{call2}", headers=auth).json()
        assert failed["status"] == "error" and failed["error"] == {
            "type": "AudioError",
            "message": "a.wav is not audio.",
        }

        # An expired result is run again on resubmission.
        fake.calls["fc-1"]["expired"] = True
        renewed = client.post("/jobs", content=job.to_json(), headers=auth)
        assert renewed.status_code == 202 and renewed.json()["call_id"] == "fc-3"


# --------------------------------------------------------------------------------------
# scripts/setup_modal_secret.sh
# --------------------------------------------------------------------------------------

FAKE_MODAL = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
record = {"args": args}
if "--from-json" in args:
    path = args[args.index("--from-json") + 1]
    record["path"] = path
    record["mode"] = oct(os.stat(path).st_mode & 0o777)
    with open(path) as fh:
        record["json"] = json.load(fh)
with open(os.environ["FAKE_MODAL_LOG"], "a") as fh:
    fh.write(json.dumps(record) + "\\n")
print("Created a new secret with the keys " + ", ".join(sorted(record.get("json", {}))))
"""

SECRETS = {
    "R2_ACCOUNT_ID": "0123456789abcdef0123456789abcdef",
    "R2_ACCESS_KEY_ID": "AKIDEXAMPLE9a8b7c6d5e4f",
    "R2_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzEXAMPLEKEY",
}


def _run_script(tmp_path: Path, env_extra: dict[str, str], dotenv: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "modal"
    fake.write_text(FAKE_MODAL.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if dotenv is not None:
        (work / ".env").write_text(dotenv)
    log = tmp_path / "modal.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("R2_", "GPU_WORKER_", "AWS_", "MODAL"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_MODAL_LOG=str(log), HOME=str(tmp_path), **env_extra)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_modal_secret.sh")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def _assert_no_secret(text: str, *values: str) -> None:
    for value in values:
        assert value not in text
        assert value[:-4] not in text  # not even most of it


def test_secret_script_from_environment(tmp_path):
    out, calls = _run_script(tmp_path, {**SECRETS, "GPU_WORKER_TOKEN": "tok-0123456789-abcdef"})
    assert out.returncode == 0, out.stderr
    _assert_no_secret(
        out.stdout + out.stderr,
        SECRETS["R2_ACCESS_KEY_ID"],
        SECRETS["R2_SECRET_ACCESS_KEY"],
        SECRETS["R2_ACCOUNT_ID"],
        "tok-0123456789-abcdef",
    )
    assert "r2-secret" in out.stdout and "****" in out.stdout
    assert len(calls) == 1
    args = calls[0]["args"]
    assert args[:4] == ["secret", "create", "--force", "r2-secret"] and "--from-json" in args
    assert not any(v in " ".join(args) for v in SECRETS.values())  # nothing secret on a command line
    assert calls[0]["json"] == {
        "AWS_ACCESS_KEY_ID": SECRETS["R2_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": SECRETS["R2_SECRET_ACCESS_KEY"],
        "AWS_REGION": "auto",
        "STEMSET_S3_ENDPOINT_URL": f"https://{SECRETS['R2_ACCOUNT_ID']}.r2.cloudflarestorage.com",
        "GPU_WORKER_TOKEN": "tok-0123456789-abcdef",
    }
    assert calls[0]["mode"] == "0o600"  # private while it exists...
    assert not Path(calls[0]["path"]).exists()  # ...and gone afterwards


def test_secret_script_from_dotenv_file(tmp_path):
    dotenv = textwrap.dedent(f"""
        # Cloudflare R2
        export R2_ACCOUNT_ID={SECRETS["R2_ACCOUNT_ID"]}
        R2_ACCESS_KEY_ID="{SECRETS["R2_ACCESS_KEY_ID"]}"
        R2_SECRET_ACCESS_KEY='{SECRETS["R2_SECRET_ACCESS_KEY"]}'
        R2_PUBLIC_URL=https://media.example.org
    """)
    out, calls = _run_script(tmp_path, {"MODAL_ENVIRONMENT": "staging"}, dotenv=dotenv)
    assert out.returncode == 0, out.stderr
    _assert_no_secret(out.stdout + out.stderr, SECRETS["R2_ACCESS_KEY_ID"], SECRETS["R2_SECRET_ACCESS_KEY"])
    assert calls[0]["args"][-2:] == ["--env", "staging"]
    secret = calls[0]["json"]
    assert secret["AWS_SECRET_ACCESS_KEY"] == SECRETS["R2_SECRET_ACCESS_KEY"]
    assert secret["AWS_ACCESS_KEY_ID"] == SECRETS["R2_ACCESS_KEY_ID"]
    assert secret["R2_PUBLIC_URL"] == "https://media.example.org"
    assert "GPU_WORKER_TOKEN" not in secret


def test_secret_script_names_missing_variables(tmp_path):
    out, calls = _run_script(tmp_path, {"R2_ACCESS_KEY_ID": SECRETS["R2_ACCESS_KEY_ID"]})
    assert out.returncode != 0 and calls == []
    assert "R2_ACCOUNT_ID" in out.stderr and "R2_SECRET_ACCESS_KEY" in out.stderr
    assert "R2_ACCESS_KEY_ID" not in out.stderr.split("not set")[0]  # the one that is set is not listed
    _assert_no_secret(out.stdout + out.stderr, SECRETS["R2_ACCESS_KEY_ID"])


def test_gpu_class_reserves_cpu_and_memory_and_takes_concurrent_inputs():
    """Issue 12: cpu= and memory= set explicitly, several inputs per warm container."""
    import gpu_worker.modal_app as app_module

    assert app_module.CPU >= 4 and app_module.MEMORY_MB >= 8192
    # Enough inputs at once to keep the GPU busy while the finishing songs use the cores.
    assert app_module.CONCURRENT_INPUTS >= app_module.FINISH_WORKERS + 3
    assert app_module.CONTAINER_ENV["STEMSET_FINISH_WORKERS"] == str(app_module.FINISH_WORKERS)
    assert app_module.FINISH_CPU > 0 and app_module.FINISH_MEMORY_MB > 0  # Option A's CPU-only Finisher
    source = Path(app_module.__file__).read_text()
    assert "cpu=CPU" in source and "memory=MEMORY_MB" in source
    assert "@modal.concurrent(max_inputs=CONCURRENT_INPUTS)" in source
    assert not any(req.startswith("pyloudnorm") for req in app_module.ENGINE_REQUIREMENTS)

"""Stemset's Modal app: the separation worker as a warm GPU class, plus a web endpoint.

Deploy with ``modal deploy gpu_worker/modal_app.py`` (or ``modal deploy -m gpu_worker.modal_app``).
This file only declares the image, the app, the class and the endpoint; the work is plain Python
(:class:`gpu_worker.remote.WarmWorker` around :func:`gpu_worker.worker.run_job`), so it runs and is
tested the same way off Modal. Importing it needs no Modal token and no network.

Settings, read when the app is deployed (and passed on to the containers):

- ``STEMSET_MODAL_APP``: the app name (default ``stemset-gpu``, gpu.app in config.yaml);
- ``STEMSET_GPU_TYPE``: the GPU (default ``A100-40GB``; T4, L4, A10G, A100-40GB, H100, ...);
- ``STEMSET_PRELOAD_MODELS``: models loaded when a container starts (default ``htdemucs``);
- ``STEMSET_MODAL_MODEL_REPO``: a Demucs repo folder inside the container, e.g. on the model
  volume (default: none, Demucs downloads weights once into the volume);
- ``STEMSET_MODAL_SCALEDOWN_S`` (default 60) and ``STEMSET_MODAL_MAX_CONTAINERS`` (default 10);
- ``STEMSET_MODAL_CPU`` (default 8 physical cores), ``STEMSET_MODAL_MEMORY_MB`` (default 16384)
  and ``STEMSET_MODAL_CONCURRENT_INPUTS`` (default 4): the container's reservation and the inputs
  it takes at once (``@modal.concurrent``); the job pipeline overlaps them on the one GPU.

Bucket credentials come from the Modal secret ``r2-secret`` (``scripts/setup_modal_secret.sh``):
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``STEMSET_S3_ENDPOINT_URL`` (used when a job's
storage reference names no endpoint) and, for the web endpoint, ``GPU_WORKER_TOKEN``.

Billing: ``billed_seconds`` in a result is the worker's own clock: the job's wall time (input
download, decode, model load, separation, encode, upload) plus, for the first job a container
runs, the seconds the container's enter hooks spent getting ready (loading the preload models on
the CPU and moving them to the GPU). With memory snapshots a restored container skips the CPU
load, so it is charged only where it ran: the load is billed when the post-snapshot hook runs in
the same Modal task (``MODAL_TASK_ID``) as the pre-snapshot one. Container boot, image pull and
idle time before scale-down are not on the worker's clock, so Modal's invoice is somewhat higher.
"""

from __future__ import annotations

import os
import sys

import modal

from gpu_worker.http_worker import create_app
from gpu_worker.remote import SpawnJobRunner, WarmWorker

APP_NAME = os.environ.get("STEMSET_MODAL_APP") or "stemset-gpu"
GPU_TYPE = os.environ.get("STEMSET_GPU_TYPE") or "A100-40GB"
SECRET_NAME = os.environ.get("STEMSET_MODAL_SECRET") or "r2-secret"
VOLUME_NAME = os.environ.get("STEMSET_MODAL_VOLUME") or "stemset-model-cache"
PRELOAD_MODELS = os.environ.get("STEMSET_PRELOAD_MODELS", "htdemucs")
CONTAINER_MODEL_REPO = os.environ.get("STEMSET_MODAL_MODEL_REPO", "")
SCALEDOWN_S = int(os.environ.get("STEMSET_MODAL_SCALEDOWN_S") or 60)
# Reserved with each GPU container (billed whether used or not; keep cost.gpu_container_cpu and
# cost.gpu_container_memory_gib in config.yaml the same): the pipeline measures, encodes and
# publishes song k on these cores while the GPU separates song k+1 (README, "Cost").
# 24 cores keep up with an A100 on htdemucs to m4a: ~20 core-seconds of decode, analysis and AAC
# encoding per 4-minute song against ~0.7 s of separation (README "Cost").
CPU = float(os.environ.get("STEMSET_MODAL_CPU") or 24.0)  # physical cores
MEMORY_MB = int(os.environ.get("STEMSET_MODAL_MEMORY_MB") or 16384)
# Songs finished at once (four stems each), and the inputs one container takes at once: one on
# the GPU, one decoded and waiting, one queued, the others being finished.
FINISH_WORKERS = int(os.environ.get("STEMSET_FINISH_WORKERS") or max(1, int(CPU) // 3))
CONCURRENT_INPUTS = int(os.environ.get("STEMSET_MODAL_CONCURRENT_INPUTS") or FINISH_WORKERS + 3)
# Option A (jobs with finish_on: cpu_function): the CPU-only function that finishes handed-off stems.
FINISH_CPU = float(os.environ.get("STEMSET_MODAL_FINISH_CPU") or 4.0)
FINISH_MEMORY_MB = int(os.environ.get("STEMSET_MODAL_FINISH_MEMORY_MB") or 4096)
MAX_CONTAINERS = int(os.environ.get("STEMSET_MODAL_MAX_CONTAINERS") or 10)
TIMEOUT_S = 1800
CACHE_DIR = "/cache"  # the model volume: Demucs' downloads (torch hub, Hugging Face) land here

# The engine's requirements, pinned to the versions the tests run (outputs depend on them).
# On Linux, PyPI's torch wheel is the CUDA build.
ENGINE_REQUIREMENTS = [
    "torch==2.13.0",
    "demucs==4.1.0",
    "soundfile==0.14.0",
    "av==18.1.0",
    "soxr==1.1.0",
    "scipy==1.17.1",  # the K-weighting filter of the loudness meter (pyloudnorm is not needed)
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "boto3==1.44.8",
    "starlette==1.10.0",  # the web endpoint
]

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libsndfile1", "ffmpeg")
    .pip_install(*ENGINE_REQUIREMENTS)
    .env(
        {
            "TORCH_HOME": f"{CACHE_DIR}/torch",
            "HF_HOME": f"{CACHE_DIR}/huggingface",
            "PYTHONUNBUFFERED": "1",
        }
    )
    .add_local_python_source("gpu_worker")
)

app = modal.App(APP_NAME, image=image)
model_cache = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
bucket_secret = modal.Secret.from_name(SECRET_NAME)

# What the containers need to know about this deployment (they re-import this file).
CONTAINER_ENV = {
    "STEMSET_MODAL_APP": APP_NAME,
    "STEMSET_GPU_TYPE": GPU_TYPE,
    "STEMSET_PRELOAD_MODELS": PRELOAD_MODELS,
    "STEMSET_FINISH_WORKERS": str(FINISH_WORKERS),
}
if CONTAINER_MODEL_REPO:
    CONTAINER_ENV["STEMSET_MODEL_REPO"] = CONTAINER_MODEL_REPO


def _cache_listing() -> set[str]:
    found = set()
    for root, _dirs, files in os.walk(CACHE_DIR):
        found.update(os.path.join(root, f) for f in files)
    return found


@app.cls(
    gpu=GPU_TYPE,
    cpu=CPU,
    memory=MEMORY_MB,
    timeout=TIMEOUT_S,
    retries=modal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=5.0),
    scaledown_window=SCALEDOWN_S,
    max_containers=MAX_CONTAINERS,
    enable_memory_snapshot=True,
    volumes={CACHE_DIR: model_cache},
    secrets=[bucket_secret],
    env=CONTAINER_ENV,
)
@modal.concurrent(max_inputs=CONCURRENT_INPUTS)
class Separator:
    """One GPU container: models loaded once; up to ``CONCURRENT_INPUTS`` jobs at once on
    threads that share the worker's job pipeline, so while work is queued the GPU separates one
    song as the previous ones are encoded and published on the container's ``CPU`` cores.

    A job that fails for its own reasons (unreadable input, unknown model, bucket refused) is
    answered with an error envelope rather than raised, so Modal does not retry what cannot
    succeed; anything unexpected (a CUDA fault, a crash) raises and Modal retries it."""

    @modal.enter(snap=True)
    def load_models(self) -> None:
        """Before the memory snapshot: load the preload models on the CPU (no GPU here yet)."""
        self.worker = WarmWorker.from_env(backend="modal", gpu_type=os.environ.get("STEMSET_GPU_TYPE") or GPU_TYPE)
        self.worker.finish_remote = _finish_remote  # Option A: jobs that ask for it finish on the Finisher
        self.loaded_in_task = os.environ.get("MODAL_TASK_ID")
        before = _cache_listing()
        self.load_s = self.worker.preload()
        if _cache_listing() != before and not modal.is_local():
            try:  # keep the downloaded weights for the next container
                model_cache.commit()
            except Exception as err:  # noqa: BLE001 - the volume commits again at shutdown
                print(f"stemset: could not commit the model cache volume now: {err}", file=sys.stderr)

    @modal.enter(snap=False)
    def start_gpu(self) -> None:
        """After the snapshot (in every container): move the models to the GPU."""
        restored = os.environ.get("MODAL_TASK_ID") != self.loaded_in_task
        gpu_s = self.worker.to_device()
        self.worker.charge_startup(gpu_s + (0.0 if restored else self.load_s))

    @modal.method()
    def separate(self, job_json: str) -> str:
        """Run one SeparationJob (JSON); the SeparationResult (JSON) or an error envelope."""
        return self.worker.handle_json(job_json)


@app.cls(
    cpu=FINISH_CPU,
    memory=FINISH_MEMORY_MB,
    timeout=TIMEOUT_S,
    retries=modal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=5.0),
    scaledown_window=SCALEDOWN_S,
    max_containers=MAX_CONTAINERS * 4,
    secrets=[bucket_secret],
    env=CONTAINER_ENV,
)
@modal.concurrent(max_inputs=2)
class Finisher:
    """Option A: a CPU-only container (no GPU) that measures, encodes and publishes the stems a
    Separator handed off (gpu_worker/handoff.py), so the GPU is released once they are written."""

    @modal.method()
    def finish(self, handoff_json: str) -> str:
        """A handoff document (JSON) -> the SeparationResult (JSON) or an error envelope."""
        from gpu_worker.remote import finish_handoff_json

        return finish_handoff_json(handoff_json)


def _finish_remote(handoff_json: str) -> str:
    return Finisher().finish.remote(handoff_json)


# --------------------------------------------------------------------------------------
# Web endpoint: POST a job -> {accepted, call_id} at once; GET /result/{call_id} to poll.
# --------------------------------------------------------------------------------------


def _spawn(job_json: str) -> str:
    return Separator().separate.spawn(job_json).object_id


def _poll(call_id: str) -> tuple[str, str | None]:
    call = modal.FunctionCall.from_id(call_id)
    try:
        return "complete", call.get(timeout=0)
    except modal.exception.OutputExpiredError:
        return "expired", None
    except (TimeoutError, modal.exception.TimeoutError):
        return "pending", None
    except Exception as err:  # noqa: BLE001 - the call itself failed (after Modal's retries)
        return "error", f"The Modal call failed: {type(err).__name__}: {err}"


def _cancel(call_id: str) -> None:
    modal.FunctionCall.from_id(call_id).cancel()


@app.function(secrets=[bucket_secret], env=CONTAINER_ENV, scaledown_window=SCALEDOWN_S, timeout=120)
@modal.concurrent(max_inputs=50)
@modal.asgi_app(label=f"{APP_NAME}-web")
def web():
    """The HTTP worker's routes (gpu_worker/http_worker.py) with jobs spawned on the Separator class.
    Every job route needs ``Authorization: Bearer $GPU_WORKER_TOKEN`` (from the r2-secret)."""
    index = modal.Dict.from_name(f"{APP_NAME}-jobs", create_if_missing=True)
    runner = SpawnJobRunner(spawn=_spawn, poll=_poll, index=index, cancel=_cancel)
    return create_app(
        runner=runner,
        token=os.environ.get("GPU_WORKER_TOKEN") or None,
        require_token=True,
        info={"backend": "modal", "app": APP_NAME, "gpu_type": GPU_TYPE},
    )

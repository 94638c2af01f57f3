"""The separation worker as an ASGI app (Starlette), for any GPU host and for Modal's web endpoint.

Routes (JSON in, JSON out; every route but ``/healthz`` needs ``Authorization: Bearer <token>``
when the app has a token):

- ``POST /jobs`` with a SeparationJob's JSON: ``202 {job_id, call_id, status: queued, ...}``.
  Idempotent by ``job_id``: the same job again answers ``200`` with the existing job (never a
  second run); the same id with a different payload is a ``409``.
- ``GET /jobs/{job_id}``: ``{job_id, status: queued|running|complete|error, progress, result?, error?}``.
- ``GET /healthz``: ``{ok: true, ...}``.
- The earlier product's endpoint shape: ``POST /`` with a job's JSON answers
  ``{accepted: true, call_id, job_id}`` at once; ``GET /result/{call_id}`` answers
  ``{status: pending|complete|error, result?, error?}``.

Errors are ``{"error": {"type", "message"}}`` with a message a person can act on; tokens are never
echoed. Jobs run on the app's job runner: in this process on a background thread, one at a time
by default (:class:`~gpu_worker.remote.ThreadJobRunner`), or on Modal
(:class:`~gpu_worker.remote.SpawnJobRunner`, wired in ``gpu_worker/modal_app.py``).

Run it with :func:`serve`, ``python -m gpu_worker.http_worker --port 8000`` or ``stemset worker serve``;
the token comes from ``GPU_WORKER_TOKEN``. Without a token the worker serves only on a loopback
address.

Hostile input: a job body is at most ``MAX_BODY_BYTES``, checked against ``Content-Length``
before reading and again while the body streams in (a chunked body stops being read at the
limit: memory stays flat). A job may name local storage only under a root this worker was
given (``--allow-local-root`` / ``STEMSET_WORKER_LOCAL_ROOTS``); none by default.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import ENGINE_VERSION
from .errors import StemsetError
from .job import JOB_VERSION, SeparationJob, StorageRef
from .remote import JobConflictError, ThreadJobRunner, WarmWorker, error_info
from .worker_args import LOCAL_ROOTS_ENV, TOKEN_ENV, add_serve_args, add_worker_args  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a job is a few kB; anything this big is not one


class WorkerConfigError(StemsetError):
    """The HTTP worker was asked to start in an unsafe or impossible way."""


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _too_big(size: int | None) -> JSONResponse:
    what = f"{size} bytes" if size is not None else f"over {MAX_BODY_BYTES} bytes"
    return _error(413, "JobError", f"The request body is {what}; a job is at most {MAX_BODY_BYTES} bytes of JSON.")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | JSONResponse:
    """The body, or a 413 as soon as it is known to pass ``limit``: from ``Content-Length``
    before reading anything, else while it streams (the rest is never read)."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return _too_big(int(length))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _too_big(None)
        chunks.append(chunk)
    return b"".join(chunks)


def local_roots_from_env(value: str | None = None) -> list[Path]:
    """The folders of ``$STEMSET_WORKER_LOCAL_ROOTS`` (os.pathsep-separated)."""
    value = os.environ.get(LOCAL_ROOTS_ENV, "") if value is None else value
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def local_root_refused(ref: StorageRef, allowed: Sequence[Path]) -> str | None:
    """Why a job may not use ``ref`` here (a local root outside every allowed folder), or None."""
    if ref.backend != "local":
        return None
    root = Path(ref.root or "").expanduser()
    if root.is_absolute():
        resolved = root.resolve()
        for base in allowed:
            base = base.resolve()
            if resolved == base or base in resolved.parents:
                return None
    return (
        f"This worker does not serve local storage at {str(ref.root)[:200]!r}: a job may name only a "
        f"folder the worker allows (--allow-local-root or {LOCAL_ROOTS_ENV} on the worker; "
        f"{len(allowed)} allowed). Use s3 storage, or allow the folder on the worker."
    )


def create_app(
    *,
    runner: Any,
    token: str | None,
    require_token: bool = False,
    info: dict[str, Any] | None = None,
    local_roots: Sequence[Path] = (),
) -> Starlette:
    """The ASGI app over ``runner`` (a ThreadJobRunner or SpawnJobRunner).

    ``token``: the bearer token clients must send (compared in constant time); None = no auth,
    which only :func:`serve` on a loopback address should allow. ``require_token``: refuse every
    job request when no token is configured (a public endpoint such as Modal's). ``local_roots``:
    the folders a job may name as local storage (none by default: s3 only)."""
    expected = token.encode() if token else None
    allowed_roots = [Path(p) for p in local_roots]
    details = {"engine_version": ENGINE_VERSION, "contract_version": JOB_VERSION, **(info or {})}

    def unauthorized(request: Request) -> JSONResponse | None:
        if expected is None:
            if require_token:
                return _error(
                    503,
                    "WorkerConfigError",
                    f"This worker has no token configured, so it accepts no jobs. Set {TOKEN_ENV} "
                    "on the worker (for Modal: add it to the r2-secret with "
                    "scripts/setup_modal_secret.sh) and restart or redeploy it.",
                )
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given and hmac.compare_digest(given.strip().encode(), expected):
            return None
        what = "was rejected" if given else "is missing"
        return _error(
            401,
            "AuthError",
            f"The bearer token {what}. Send 'Authorization: Bearer <token>' with the worker's "
            f"token ({TOKEN_ENV} on the worker, gpu.token in config.yaml on the caller).",
            headers={"WWW-Authenticate": 'Bearer realm="stemset-worker"'},
        )

    async def read_job(request: Request) -> SeparationJob | JSONResponse:
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            job = SeparationJob.from_json(body)
            for ref in {job.storage, job.out_storage}:
                refused = local_root_refused(ref, allowed_roots)
                if refused is not None:
                    return _error(403, "JobError", refused)
            return job
        except StemsetError as err:
            return _error(400, type(err).__name__, str(err))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return _error(400, "JobError", f"The request body is not a valid job: {type(err).__name__}: {err}.")

    async def submit(request: Request) -> tuple[Any, bool] | JSONResponse:
        denied = unauthorized(request)
        if denied is not None:
            return denied
        job = await read_job(request)
        if isinstance(job, JSONResponse):
            return job
        try:
            return await run_in_threadpool(runner.submit, job)
        except JobConflictError as err:
            return _error(409, "JobConflictError", str(err))
        except StemsetError as err:
            return _error(400, type(err).__name__, str(err))
        except Exception as err:  # noqa: BLE001 - the platform failed to take the job
            log.exception("could not start job %s", job.job_id)
            info_ = error_info(err)
            return _error(503, info_["type"], info_["message"])

    async def post_job(request: Request) -> JSONResponse:
        out = await submit(request)
        if isinstance(out, JSONResponse):
            return out
        record, created = out
        return JSONResponse(record.to_dict(), status_code=202 if created else 200)

    async def lookup(request: Request, param: str, find: Callable[[str], Any], missing: str) -> Any:
        """The authorised request's record named by a path parameter, or the error response."""
        denied = unauthorized(request)
        if denied is not None:
            return denied
        key = request.path_params[param]
        record = await run_in_threadpool(find, key)
        return _error(404, "NotFound", missing.format(key=key)) if record is None else record

    async def get_job(request: Request) -> JSONResponse:
        record = await lookup(
            request,
            "job_id",
            runner.get,
            "This worker knows no job {key!r} (it may have restarted); submit the job again: job ids make that safe.",
        )
        return record if isinstance(record, JSONResponse) else JSONResponse(record.to_dict())

    async def post_seed(request: Request) -> JSONResponse:
        out = await submit(request)
        if isinstance(out, JSONResponse):
            return out
        record, _created = out
        return JSONResponse(
            {"accepted": True, "call_id": record.call_id or record.job_id, "job_id": record.job_id}, status_code=202
        )

    async def get_result(request: Request) -> JSONResponse:
        record = await lookup(request, "call_id", runner.get_call, "No call {key!r} on this worker.")
        if isinstance(record, JSONResponse):
            return record
        call_id = request.path_params["call_id"]
        out: dict[str, Any] = {
            "call_id": call_id,
            "job_id": record.job_id,
            "status": {"queued": "pending", "running": "pending"}.get(record.status, record.status),
        }
        if record.result is not None:
            out["result"] = record.result
        if record.error is not None:
            out["error"] = record.error
        return JSONResponse(out)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, **details, "jobs": runner.stats(), "auth": expected is not None})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            yield
        finally:
            runner.shutdown()

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/jobs", post_job, methods=["POST"]),
            Route("/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/", post_seed, methods=["POST"]),
            Route("/result/{call_id}", get_result, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve jobs without a token anywhere but on a loopback address."""
    if not token and not is_loopback(host):
        raise WorkerConfigError(
            f"Refusing to serve on {host} without a token: anyone who can reach it could run jobs "
            "with this machine's bucket credentials.",
            f"Set {TOKEN_ENV} to a long random string (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`) "
            "and give the same token to the caller (gpu.token in config.yaml), or bind to 127.0.0.1.",
        )


def build_app(
    token: str | None = None,
    model_repo: str | None = None,
    *,
    preload: Sequence[str] = (),
    max_concurrent: int = 4,
    gpu_type: str | None = None,
    device: str = "auto",
    local_roots: Sequence[Path] = (),
) -> Starlette:
    """The in-process worker app: a WarmWorker (models preloaded, moved to the GPU) behind the routes."""
    worker = WarmWorker(backend="http", model_repo=model_repo, preload_models=preload, gpu_type=gpu_type, device=device)
    worker.charge_startup(worker.preload() + worker.to_device())
    runner = ThreadJobRunner(worker, max_concurrent=max_concurrent)
    return create_app(
        runner=runner,
        token=token,
        info={"backend": "http", "gpu_type": gpu_type, "max_concurrent": max_concurrent},
        local_roots=local_roots,
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    model_repo: str | None = None,
    *,
    preload: Sequence[str] = (),
    max_concurrent: int = 4,
    gpu_type: str | None = None,
    device: str = "auto",
    log_level: str = "info",
    local_roots: Sequence[Path] = (),
) -> None:
    """Run the worker with uvicorn until interrupted. Without ``token`` only a loopback host is allowed."""
    check_bind(host, token)
    import uvicorn  # lazy: only serving needs it, not every `stemset` command that registers this one

    app = build_app(
        token,
        model_repo,
        preload=preload,
        max_concurrent=max_concurrent,
        gpu_type=gpu_type,
        device=device,
        local_roots=local_roots,
    )
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, timeout_graceful_shutdown=5)


# --------------------------------------------------------------------------------------
# Command line: `python -m gpu_worker.http_worker` and the `stemset worker serve` glue
# --------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    """Serve the separation worker over HTTP (token from $GPU_WORKER_TOKEN)."""
    preload = args.preload if args.preload is not None else os.environ.get("STEMSET_PRELOAD_MODELS", "")
    serve(
        host=args.host,
        port=args.port,
        token=os.environ.get(TOKEN_ENV) or None,
        model_repo=args.model_repo or os.environ.get("STEMSET_MODEL_REPO") or None,
        preload=[m.strip() for m in preload.split(",") if m.strip()],
        max_concurrent=args.max_concurrent,
        gpu_type=args.gpu_type or os.environ.get("STEMSET_GPU_TYPE") or None,
        device=args.device,
        log_level=args.log_level,
        local_roots=[Path(p) for p in args.allow_local_root] if args.allow_local_root else local_roots_from_env(),
    )
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run a separation worker on this machine (`stemset worker serve`)."""
    if args.worker_command == "serve":
        return run_serve(args)
    raise WorkerConfigError(f"Unknown worker command {args.worker_command!r}.", "Use `stemset worker serve`.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.http_worker", description=run_serve.__doc__)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except StemsetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

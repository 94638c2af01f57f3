"""The Stemset web API and page (Starlette).

Routes (JSON; every ``/api/`` route needs ``Authorization: Bearer <api.token>`` unless auth is
explicitly off; the page and its static files are public and hold no data):

- ``POST /api/upload/{profile}``: multipart form with ``file`` (and optional ``strategy``);
  ``202 {job_id, partition, status, object_key}``. 404 unknown profile, 411 no length,
  413 over ``api.max_upload_mb``, 415 not an audio file, 400 unreadable audio.
- ``GET /api/jobs/{job_id}``: ``{status: queued|running|complete|error, stems: {name: url}, error, ...}``.
- ``GET /api/recordings``: the catalog as JSON (one entry per recording, its strategies' states
  and stem URLs, and totals).
- ``GET /api/config``: profiles and strategies, for the page.
- ``GET /api/media/{key}``: a stem, peaks file or canonical recording, streamed from the store.
- ``GET /``: the player page; ``/static/...`` its script and style; ``GET /healthz``.

Every error, on every route (unknown routes and methods too), is JSON
``{"error": {"type", "message"}}`` with its status: 404/405 for unknown routes and methods, 503
when storage (or the Dagster instance) cannot be reached, 500 for anything unexpected (logged,
never echoed). Neither the token nor storage credentials ever appear in a response or a log line.

Stem and media URLs are ``api.public_url`` + ``/api/media/<key>`` when that is set, else
root-relative (``/api/media/<key>``): never built from the request's Host header.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gpu_worker.errors import StemsetError, StorageError
from gpu_worker.stores.base import ObjectStore, guess_content_type
from gpu_worker.stores.local import LocalObjectStore

from ..core.catalog import build_catalog, totals
from ..core.layout import OUTPUTS, RECORDINGS, is_hidden_key
from ..core.uploads import UploadRejected, check_audio_file, safe_filename
from ..defs.intake import ingest_file
from ..defs.partitions import RECORDINGS_PARTITIONS
from .jobs import JobManager

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MiB = 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields around the file
MEDIA_PREFIXES = (f"{OUTPUTS}/", f"{RECORDINGS}/")


class ApiConfigError(StemsetError):
    """The API was asked to start in an unsafe way (auth on without a token, public bind without one)."""


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, method not allowed, missing static file) as JSON."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No route {request.url.path[:200]!r}."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path[:200]!r}."
    else:
        message = str(exc.detail)
    return _error(exc.status_code, _HTTP_KINDS.get(exc.status_code, "HTTPError"), message, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    """Storage or the Dagster instance out of reach: 503 with what to do; anything else: a 500
    that names no detail (the log has it)."""
    if isinstance(exc, StorageError) or _unreachable(exc):
        log.warning("%s %s: storage unavailable: %s", request.method, request.url.path, exc)
        return _error(
            503,
            "StorageUnavailable",
            "The media storage (or the Dagster instance) cannot be reached right now; try again in a "
            "minute. The server's log says which.",
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, StemsetError):
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(503, type(exc).__name__, str(exc))
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "InternalError", "The server failed on this request; its log has the details.")


def _unreachable(exc: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out, DNS), anywhere in the cause chain."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "OperationalError",
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/NaT/inf -> None, timestamps -> ISO text, numpy scalars -> Python."""
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        try:
            return None if value != value else value.isoformat()  # NaT != NaT
        except (TypeError, ValueError):
            return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def catalog_json(store: ObjectStore, config, partition_keys, media_url) -> dict[str, Any]:
    """The catalog grouped by recording: ``{recordings: [{partition, profile, name, duration_s,
    strategies: {name: {state, reason, default, stems: {stem: url}, cost_usd, ...}}}], totals}``."""
    df = build_catalog(store, config, partition_keys)
    recordings: dict[str, dict[str, Any]] = {}
    for row in df.to_dict(orient="records"):
        row = {k: _clean(v) for k, v in row.items()}
        pk = row["partition"]
        rec = recordings.setdefault(
            pk,
            {
                "partition": pk,
                "profile": row["profile"],
                "name": (row["original_key"] or pk).rsplit("/", 1)[-1],
                "duration_s": row["duration_s"],
                "recording_state": row["recording_state"],
                "strategies": {},
            },
        )
        # Only whole sets are playable (the state rule): a broken set's recorded URLs would answer 404.
        keys = json.loads(row["stem_keys"]) if row["stem_keys"] else {}
        stems = {name: media_url(key) for name, key in keys.items()}
        rec["strategies"][row["strategy"]] = {
            "state": row["state"],
            "reason": row["reason"],
            "detail": row["detail"],
            "default": bool(row["default"]),
            "stems": stems,
            "format": row["format"],
            "gpu_type": row["gpu_type"],
            "gpu_seconds": row["gpu_seconds"],
            "cost_usd": row["cost_usd"],
            "made_at": row["made_at"],
        }
    return {"recordings": list(recordings.values()), "totals": {k: _clean(v) for k, v in totals(df).items()}}


def create_app(
    config, *, store: ObjectStore, instance, jobs: JobManager, token: str | None, auth: bool = True
) -> Starlette:
    """The app. ``auth=True`` needs ``token`` (compared in constant time); ``auth=False`` serves
    without one (only :func:`~stemset_assets.api.server.serve` on loopback should allow it)."""
    if auth and not token:
        raise ApiConfigError(
            "The web API needs a token: api.auth is true but api.token is empty.",
            "Set STEMSET_API_TOKEN (api.token in config.yaml), or for local use only set api.auth: false.",
        )
    expected = token.encode() if auth and token else None
    cap = config.api.max_upload_mb * MiB

    def denied(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given and hmac.compare_digest(given.strip().encode(), expected):
            return None
        what = "was rejected" if given else "is missing"
        return _error(
            401,
            "AuthError",
            f"The bearer token {what}. Send 'Authorization: Bearer <token>' "
            "with the API's token (STEMSET_API_TOKEN on the server).",
            headers={"WWW-Authenticate": 'Bearer realm="stemset"'},
        )

    base_url = (config.api.public_url or "").rstrip("/")

    def media_url(request: Request | None = None):
        """Media URLs from configuration (``api.public_url``, else root-relative), never from
        the request's Host header, which a client controls."""
        return lambda key: f"{base_url}/api/media/{quote(key, safe='/')}"

    async def take_upload(profile: str, form) -> Response | tuple[Any, str, list[str]]:
        """Check the form's file and put it in the profile's inputs: (ingested, name, strategies)."""
        file = form.get("file")
        if not isinstance(file, UploadFile):
            return _error(400, "BadRequest", "The form has no file field named 'file'.")
        strategy = form.get("strategy")
        if isinstance(strategy, str) and strategy:
            if strategy not in config.strategies:
                return _error(
                    400, "BadRequest", f"No strategy named {strategy[:64]!r} (known: {', '.join(config.strategies)})."
                )
            strategies = [strategy]
        else:
            strategies = list(config.profiles[profile].strategies)
        if not strategies:
            return _error(400, "BadRequest", f"Profile {profile!r} runs no strategy; choose one.")
        name = safe_filename(file.filename or "upload")
        with tempfile.TemporaryDirectory(prefix="stemset-upload-") as tmp:
            path = Path(tmp) / "upload"
            size = await run_in_threadpool(_spool, file, path)
            if size > cap:
                return _error(
                    413,
                    "TooLarge",
                    f"{name!r} is {size / MiB:.1f} MB; the limit is {config.api.max_upload_mb} MB (api.max_upload_mb).",
                )
            try:
                await run_in_threadpool(check_audio_file, path, name)
                ingested = await run_in_threadpool(ingest_file, store, instance, profile, path, name)
            except UploadRejected as err:
                return _error(err.status, "UnsupportedMedia" if err.status == 415 else "BadAudio", str(err))
            except StemsetError as err:
                log.warning("upload of %r failed: %s", name, err.message)
                return _error(503, type(err).__name__, str(err))
        return ingested, name, strategies

    async def upload(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        profile = request.path_params["profile"]
        if profile not in config.profiles:
            return _error(404, "NotFound", f"No profile named {profile[:64]!r} (known: {', '.join(config.profiles)}).")
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return _error(411, "LengthRequired", "Send the upload with a Content-Length header.")
        if int(length) > cap + FORM_OVERHEAD:
            return _error(
                413,
                "TooLarge",
                f"The upload is {int(length) / MiB:.1f} MB; the limit is "
                f"{config.api.max_upload_mb} MB (api.max_upload_mb).",
            )
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - malformed multipart
            return _error(400, "BadRequest", f"The body is not a multipart form with a file: {type(err).__name__}.")
        try:
            taken = await take_upload(profile, form)
        finally:
            await form.close()
        if isinstance(taken, Response):
            return taken
        ingested, name, strategies = taken
        try:
            job = await run_in_threadpool(jobs.submit, ingested.partition, strategies)
        except StemsetError as err:
            log.warning("job for %s not started: %s", ingested.partition, err.message)
            return _error(503, type(err).__name__, f"{name!r} was stored, but its job did not start: {err}")
        log.info("upload %s -> %s (job %s)", ingested.object_key, ingested.partition, job.job_id)
        return JSONResponse(
            {
                "job_id": job.job_id,
                "partition": ingested.partition,
                "status": job.status,
                "object_key": ingested.object_key,
                "name": name,
                "strategies": strategies,
            },
            status_code=202,
        )

    async def get_job(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(jobs.get, job_id)
        if job is None:
            return _error(404, "NotFound", f"No job {job_id[:64]!r}.")
        return JSONResponse(await run_in_threadpool(jobs.to_dict, job, media_url(request)))

    async def recordings(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no

        def build() -> dict[str, Any]:
            keys = instance.get_dynamic_partitions(RECORDINGS_PARTITIONS)
            return catalog_json(store, config, keys, media_url(request))

        return JSONResponse(await run_in_threadpool(build))

    async def api_config(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        return JSONResponse(
            {
                "profiles": {
                    n: {"description": p.description, "strategies": list(p.strategies)}
                    for n, p in config.profiles.items()
                },
                "strategies": {n: list(s.stems) for n, s in config.strategies.items()},
                "max_upload_mb": config.api.max_upload_mb,
            }
        )

    async def media(request: Request) -> Response:
        if (no := denied(request)) is not None:
            return no
        key = request.path_params["key"]
        parts = key.split("/")
        if not key.startswith(MEDIA_PREFIXES) or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
            return _error(404, "NotFound", "No such media object.")
        if is_hidden_key(key):  # staging: not published
            return _error(404, "NotFound", "No such media object.")
        info = await run_in_threadpool(store.head, key)
        if info is None:
            return _error(404, "NotFound", "No such media object.")
        content_type = guess_content_type(key) or "application/octet-stream"
        if isinstance(store, LocalObjectStore):
            return FileResponse(store.uri(key), media_type=content_type)
        reader = await run_in_threadpool(store.open_read, key)

        def chunks():
            with reader:
                while block := reader.read(256 * 1024):
                    yield block

        return StreamingResponse(chunks(), media_type=content_type, headers={"Content-Length": str(info.size)})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def healthz(request: Request) -> Response:
        via = "webserver" if jobs.webserver is not None else "in-process"
        return JSONResponse({"ok": True, "auth": expected is not None, "jobs": via, "worker_pid": jobs.worker.pid})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await run_in_threadpool(jobs.start)  # reconcile runs left by an earlier process, then dispatch
        try:
            yield
        finally:
            await run_in_threadpool(jobs.close)  # end the job worker; a run in hand is queued again

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/api/config", api_config),
            Route("/api/upload/{profile}", upload, methods=["POST"]),
            Route("/api/jobs/{job_id}", get_job),
            Route("/api/recordings", recordings),
            Route("/api/media/{key:path}", media),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: _http_error, StemsetError: _server_error, Exception: _server_error},
    )


def _spool(file: UploadFile, path: Path) -> int:
    """Copy the uploaded part to ``path``; returns its size in bytes."""
    file.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out, 1024 * 1024)
    return path.stat().st_size

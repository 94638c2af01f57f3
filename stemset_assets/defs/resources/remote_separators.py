"""Clients for the remote separator backends: a deployed Modal class and an HTTP worker.

Plain classes, no Dagster: the separator resource wraps them. Both send a
:class:`~gpu_worker.job.SeparationJob` as JSON and get back the
:class:`~gpu_worker.job.SeparationResult` the worker published (stems first, manifest last). A
job that fails on the worker raises here as the same Stemset error class with the worker's
message verbatim (AudioError, ModelError, StorageError, ...); trouble reaching the worker raises
a :class:`RemoteSeparatorError` subclass that says what to do.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from gpu_worker.errors import StemsetError
from gpu_worker.job import SeparationJob, SeparationResult
from gpu_worker.remote import decode_response, error_from_info

DEPLOY_HINT = "Deploy it with `modal deploy gpu_worker/modal_app.py` (README: 'Separating on a GPU')."
TOKEN_HINT = "Run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET) on this machine."


class RemoteSeparatorError(StemsetError):
    """A remote separator backend could not be used."""


class ModalNotDeployedError(RemoteSeparatorError):
    """The Modal app or its Separator class is not deployed where we looked."""


class ModalAuthError(RemoteSeparatorError):
    """No Modal token on this machine, or Modal rejected it."""


class WorkerUnreachableError(RemoteSeparatorError):
    """The worker could not be reached (or kept failing) after every retry."""


class WorkerAuthError(RemoteSeparatorError):
    """The HTTP worker rejected our bearer token."""


class WorkerTimeoutError(RemoteSeparatorError):
    """The job did not finish within the client's overall timeout."""


# --------------------------------------------------------------------------------------
# Modal
# --------------------------------------------------------------------------------------


class ModalSeparatorClient:
    """Jobs on the deployed ``Separator`` class of a Modal app.

    ``cls_factory()`` returns the class handle (default ``modal.Cls.from_name(app_name, class_name)``);
    tests pass a stand-in whose instances' ``separate`` has ``.remote`` and ``.map``.
    """

    def __init__(
        self,
        app_name: str = "stemset-gpu",
        class_name: str = "Separator",
        *,
        environment_name: str | None = None,
        cls_factory: Callable[[], Any] | None = None,
    ):
        self.app_name = app_name
        self.class_name = class_name
        self.environment_name = environment_name
        self._cls_factory = cls_factory or self._lookup
        self._instance: Any = None

    def __repr__(self) -> str:
        return f"ModalSeparatorClient(app_name={self.app_name!r}, class_name={self.class_name!r})"

    def _lookup(self) -> Any:
        import modal  # lazy: the Modal client is heavy and only the modal backend needs it

        return modal.Cls.from_name(self.app_name, self.class_name, environment_name=self.environment_name)

    def _method(self) -> Any:
        if self._instance is None:
            self._instance = self._cls_factory()()
        return self._instance.separate

    def separate(self, job: SeparationJob) -> SeparationResult:
        """Run one job on Modal and wait for its result."""
        try:
            answer = self._method().remote(job.to_json())
        except StemsetError:
            raise
        except Exception as err:  # noqa: BLE001 - translated below
            raise self._translate(err, job) from err
        return decode_response(answer)

    def separate_many(self, jobs: Sequence[SeparationJob]) -> list[SeparationResult | Exception]:
        """Fan ``jobs`` out over Modal containers (``.map``). One entry per job, in order: its result,
        or the exception it failed with (the other jobs are unaffected). A failure that stops the
        whole call (app not deployed, no token) raises instead."""
        jobs = list(jobs)
        if not jobs:
            return []
        try:
            answers = list(self._method().map([job.to_json() for job in jobs], return_exceptions=True))
        except StemsetError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._translate(err, None) from err
        if len(answers) != len(jobs):
            raise RemoteSeparatorError(f"Modal returned {len(answers)} answers for {len(jobs)} jobs.")
        out: list[SeparationResult | Exception] = []
        for job, answer in zip(jobs, answers, strict=True):
            if isinstance(answer, BaseException):
                out.append(answer if isinstance(answer, StemsetError) else self._translate(answer, job))
                continue
            try:
                out.append(decode_response(answer))
            except StemsetError as err:
                out.append(err)
        return out

    def _translate(self, err: BaseException, job: SeparationJob | None) -> StemsetError:
        import modal.exception as mexc  # lazy: see _lookup

        where = f"the Modal app {self.app_name!r} (class {self.class_name!r}"
        where += f", environment {self.environment_name!r})" if self.environment_name else ")"
        if isinstance(err, StemsetError):
            return err
        if isinstance(err, mexc.NotFoundError):
            return ModalNotDeployedError(f"Could not find {where}: {err}", DEPLOY_HINT)
        if isinstance(err, (mexc.AuthError, mexc.PermissionDeniedError)):
            return ModalAuthError(f"Modal refused the call to {where}: {err}", TOKEN_HINT)
        if isinstance(err, mexc.FunctionTimeoutError):
            what = f"job {job.job_id!r}" if job else "a job"
            return WorkerTimeoutError(
                f"Modal stopped {what} at the class timeout: {err}",
                "Split long recordings, or raise timeout= in gpu_worker/modal_app.py.",
            )
        if isinstance(err, mexc.ConnectionError):
            return WorkerUnreachableError(
                f"Could not reach Modal for {where}: {err}", "Check this machine's network; job ids make a retry safe."
            )
        what = f"job {job.job_id!r}" if job else "the call"
        return RemoteSeparatorError(
            f"{what} failed on {where}: {type(err).__name__}: {err}", "See `modal app logs " + self.app_name + "`."
        )


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A request failed in a way worth retrying (connection trouble, 5xx)."""


class HttpSeparatorClient:
    """Jobs on a Stemset HTTP worker (``stemset worker serve`` on any GPU host, or the Modal web app).

    ``separate`` POSTs the job, then polls ``GET /jobs/{id}`` every ``poll_s`` until it is complete
    or failed, within ``timeout_s`` overall. Connection errors and 5xx answers are retried with
    exponential backoff (``retries`` in a row, then :class:`WorkerUnreachableError`); job ids are
    idempotent, so resubmitting is safe, and a worker that restarted and forgot the job gets it again.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float = 1800,
        poll_s: float = 1.0,
        retries: int = 5,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        request_timeout_s: float = 30.0,
    ):
        if not url:
            raise RemoteSeparatorError(
                "No GPU worker URL configured.",
                "Set gpu.url in config.yaml (or GPU_WORKER_URL) to the worker's base URL.",
            )
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RemoteSeparatorError(
                f"The GPU worker URL {self._safe(url)!r} is not an http(s) URL.",
                "Use e.g. http://gpu-host:8000 or the https URL Modal printed.",
            )
        if parsed.username or parsed.password:
            raise RemoteSeparatorError(
                f"The GPU worker URL {self._safe(url)!r} carries a user name or password.",
                "Remove it from gpu.url: the worker authenticates with the bearer token in gpu.token.",
            )
        self.url = url.rstrip("/")
        self._token = token or None
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.request_timeout_s = float(request_timeout_s)

    def __repr__(self) -> str:  # the token never appears
        return (
            f"HttpSeparatorClient(url={self._safe(self.url)!r}, token={'****' if self._token else None}, "
            f"timeout_s={self.timeout_s}, poll_s={self.poll_s}, retries={self.retries})"
        )

    @staticmethod
    def _safe(url: str) -> str:
        """The URL without any user:password part."""
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            parts = parts._replace(netloc=netloc)
        return urllib.parse.urlunsplit(parts)

    # -- public -------------------------------------------------------------------------
    def separate(self, job: SeparationJob) -> SeparationResult:
        deadline = time.monotonic() + self.timeout_s
        body = job.to_json().encode()
        state = self._call("POST", "/jobs", body, deadline, job)
        while True:
            status = state.get("status")
            if status == "complete":
                return SeparationResult.from_dict(state["result"])
            if status == "error":
                raise error_from_info(state.get("error"))
            if status not in ("queued", "running"):
                raise RemoteSeparatorError(
                    f"The GPU worker at {self._safe(self.url)} answered job "
                    f"{job.job_id!r} with an unknown status {status!r}."
                )
            self._sleep(self.poll_s, deadline, job)
            state = self._call(
                "GET", f"/jobs/{urllib.parse.quote(job.job_id, safe='')}", None, deadline, job, resubmit=body
            )

    def separate_many(self, jobs: Sequence[SeparationJob]) -> list[SeparationResult | Exception]:
        """Each job in turn (the worker runs one at a time anyway); per-job exceptions in place."""
        out: list[SeparationResult | Exception] = []
        for job in jobs:
            try:
                out.append(self.separate(job))
            except (WorkerAuthError, WorkerUnreachableError):
                raise
            except StemsetError as err:
                out.append(err)
        return out

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/healthz", None, time.monotonic() + self.request_timeout_s, None)

    # -- requests -----------------------------------------------------------------------
    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        deadline: float,
        job: SeparationJob | None,
        resubmit: bytes | None = None,
    ) -> dict[str, Any]:
        """One logical request with retries. A 404 on a job poll (the worker restarted and forgot
        it) resubmits ``resubmit`` and counts as a retry."""
        failures = 0
        last = ""
        while True:
            try:
                status, data = self._request(method, path, body, deadline, job)
            except _Retryable as err:
                last = str(err)
            else:
                if status == 404 and resubmit is not None:
                    last = "the worker no longer knew the job (restarted?); resubmitted it"
                    try:
                        status, data = self._request("POST", "/jobs", resubmit, deadline, job)
                    except _Retryable as err:
                        last = str(err)
                    else:
                        if status < 300:
                            return data
                        self._raise_for(status, data, job)
                elif status < 300:
                    return data
                else:
                    self._raise_for(status, data, job)
            failures += 1
            if failures > self.retries:
                what = f"job {job.job_id!r}" if job else "the request"
                raise WorkerUnreachableError(
                    f"The GPU worker at {self._safe(self.url)} failed {failures} time(s) in a row on {what}: {last}.",
                    "Check that the worker is running and reachable. Readers find stems only through the set's "
                    "manifest, which switches from the old set to the new one in one write, so an interrupted job "
                    "leaves the previous set (or none) visible; run it again (same job id) once the worker is back "
                    "and its leftovers are removed.",
                )
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
            self._sleep(delay, deadline, job)

    def _request(
        self, method: str, path: str, body: bytes | None, deadline: float, job: SeparationJob | None
    ) -> tuple[int, dict[str, Any]]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._timeout(job)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=min(self.request_timeout_s, remaining)) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
            err.close()
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise _Retryable(f"{method} {path}: {type(reason).__name__}: {reason}") from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"_raw": raw[:300].decode("utf-8", "replace")}
        if status >= 500 or status == 429:
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            raise _Retryable(f"{method} {path}: HTTP {status}" + (f": {message}" if message else ""))
        if not isinstance(data, dict):
            raise RemoteSeparatorError(
                f"The GPU worker at {self._safe(self.url)} answered {method} {path} with JSON that is not an object."
            )
        return status, data

    def _raise_for(self, status: int, data: dict[str, Any], job: SeparationJob | None) -> None:
        if status in (401, 403):
            raise WorkerAuthError(
                f"The GPU worker at {self._safe(self.url)} rejected the token (HTTP {status}).",
                "Set gpu.token in config.yaml (GPU_WORKER_TOKEN) to the token the worker was started with.",
            )
        if isinstance(data.get("error"), dict):
            raise error_from_info(data["error"])
        raise RemoteSeparatorError(
            f"The GPU worker at {self._safe(self.url)} answered HTTP {status}: {data.get('_raw', data)}."
        )

    def _sleep(self, seconds: float, deadline: float, job: SeparationJob | None) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._timeout(job)
        time.sleep(max(0.0, min(seconds, remaining)))

    def _timeout(self, job: SeparationJob | None) -> None:
        what = f"Job {job.job_id!r}" if job else "The request"
        raise WorkerTimeoutError(
            f"{what} did not finish on the GPU worker at {self._safe(self.url)} within {self.timeout_s:g} s.",
            "Raise gpu.timeout_s for long recordings, or check the worker's load; the job keeps its id, "
            "so asking again picks up the running job instead of starting a second one.",
        )

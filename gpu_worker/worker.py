"""Run one separation job: fetch the input, separate, encode, stage, publish stems + manifest.

The same function serves every backend: in-process (the local separator, `stemset separate`),
behind HTTP (`stemset worker serve`) and inside the Modal class. It runs the three stages of
:mod:`gpu_worker.stages` one after another; :class:`gpu_worker.pipeline.JobPipeline` runs the
same stages overlapped over a backlog. Stems are written under staging keys and published as a
complete set, the manifest last, so a reader that finds a manifest finds every stem it lists.
"""

from __future__ import annotations

from .job import SeparationJob, SeparationResult
from .manifests import read_manifest  # noqa: F401 - the worker's public name
from .stages import (  # noqa: F401 - the worker's public names
    DEFAULT_STREAM_MIN_SECONDS,
    EXTENSIONS,
    STREAM_MIN_SECONDS_ENV,
    STREAM_WINDOW_ENV,
    Encoder,
    Observer,
    Progress,
    fetch,
    finish,
    job_seed,
    manifest_key,
    open_store,
    separate,
    stem_key,
)
from .stores.base import ObjectStore


def run_job(
    job: SeparationJob,
    *,
    store: ObjectStore | None = None,
    output_store: ObjectStore | None = None,
    progress: Progress | None = None,
    backend: str = "local",
    startup_s: float = 0.0,
    encode: Encoder | None = None,
    observer: Observer | None = None,
) -> SeparationResult:
    """Separate ``job.input_key`` and publish the stems. ``store`` overrides ``job.storage``.

    ``startup_s`` is time the calling worker spent getting ready for this job before the call
    (a warm worker's model preload, charged to the first job of a container): it is reported as
    ``timings["startup"]`` and added to ``billed_seconds``. Run alone, a job holds the device
    from its first byte to its manifest: ``billed_seconds`` is its whole wall time.
    """
    state = fetch(
        job,
        store=store,
        output_store=output_store,
        progress=progress,
        backend=backend,
        startup_s=startup_s,
        observer=observer,
    )
    try:
        return finish(separate(state), encode=encode)
    finally:
        state.close()

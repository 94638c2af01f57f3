"""``separator``: the Dagster resource that runs a :class:`~gpu_worker.job.SeparationJob`.

One interface for every backend: :meth:`SeparatorResource.separate` (one job) and
:meth:`SeparatorResource.separate_many` (several; remote backends fan them out). Each returns
the worker's :class:`~gpu_worker.job.SeparationResult` once the stems and their manifest are
published in the media store.

- ``local``: :func:`gpu_worker.worker.run_job` in this process (CPU, or a local CUDA GPU),
  reading and writing through the media store the asset passes in; several jobs go through
  :class:`gpu_worker.pipeline.JobPipeline` (the same stages, overlapped).
- ``modal``: the deployed ``Separator`` class of the Modal app ``gpu.app``
  (:class:`~stemset_assets.defs.resources.remote_separators.ModalSeparatorClient`): ``.remote`` for
  one job, ``.map`` over many (one container per input, up to Modal's autoscaling).
- ``http``: a Stemset worker at ``gpu.url`` (``stemset worker serve`` on any GPU host), with the
  bearer token ``gpu.token`` (:class:`~stemset_assets.defs.resources.remote_separators.HttpSeparatorClient`).

Remote workers read the input from, and publish the stems to, the bucket themselves with their
own credentials; the job carries only where (never secrets, never this machine's model folder:
the worker uses its own).

Cost: GPU seconds (``billed_seconds``) at the GPU's price plus CPU core-seconds and memory at
theirs for remote backends; local runs at the configured local rates, default 0
(:meth:`SeparatorResource.cost`, through :mod:`stemset_assets.core.cost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from dagster import ConfigurableResource, Failure
from pydantic import Field, PrivateAttr

from gpu_worker.errors import StemsetError
from gpu_worker.job import SeparationJob, SeparationResult
from gpu_worker.pipeline import JobPipeline
from gpu_worker.stores.base import ObjectStore
from gpu_worker.worker import run_job

from ...config import CostConfig, GpuConfig, StemsetConfig, raw_section
from ...core.cost import Prices, price_for, prices_from_config, result_cost
from .media_store import env_or_value
from .remote_separators import HttpSeparatorClient, ModalSeparatorClient

BACKENDS = ("local", "modal", "http")


class SeparatorResource(ConfigurableResource):
    """Where Demucs runs: ``local`` (in-process), ``modal`` or ``http`` (remote GPU workers)."""

    backend: str = Field(default="local", description="local | modal | http")
    gpu_type: str = Field(default="A100-40GB", description="the GPU asked of remote backends; picks the price")
    price_per_hour: float = Field(default=2.50, description="US$ per hour of gpu_type, for cost_usd")
    prices_per_hour: dict[str, float] = Field(default_factory=dict, description="US$ per hour by GPU type")
    device: str = Field(default="auto", description="local backend: auto | cpu | cuda | cuda:N")
    app_name: str = Field(default="stemset-gpu", description="modal: the deployed app's name")
    url: str | None = Field(default=None, description="http: the worker's base URL")
    token: str | None = Field(default=None, description="http: the worker's bearer token (an env var)")
    timeout_s: float = Field(default=1800.0, description="remote: the longest one job may take")
    finish_on: str = Field(default="worker", description="modal: worker (Option B) | cpu_function (Option A)")
    cost_rates: dict[str, float] = Field(
        default_factory=lambda: _rates(CostConfig()), description="CPU, memory and local rates (config: cost)"
    )
    prices_read: str = Field(default=CostConfig().prices_read, description="when the list prices were read")

    _client: object | None = PrivateAttr(default=None)

    def separate(self, job: SeparationJob, store: ObjectStore) -> SeparationResult:
        """Run one job; ``store`` is the media store (used directly by the local backend)."""
        if self.backend == "local":
            return run_job(self._for_local(job), store=store, backend="local")
        return self.remote_client().separate(self._for_remote(job))

    def separate_many(self, jobs: Sequence[SeparationJob], store: ObjectStore) -> list[SeparationResult | Exception]:
        """Run several jobs: locally through the job pipeline (the device separates the next song
        while the last one is encoded and published), fanned out by remote backends. A job that
        fails is its exception in place (the others still run); trouble reaching the backend raises."""
        if self.backend == "local":
            if len(jobs) == 1:
                try:
                    return [self.separate(jobs[0], store)]
                except StemsetError as err:
                    return [err]
            jobs = [self._for_local(job) for job in jobs]
            with JobPipeline() as pipe:
                return pipe.run_many(jobs, store=store, backend="local")
        return list(self.remote_client().separate_many([self._for_remote(job) for job in jobs]))

    def remote_client(self):
        """The Modal or HTTP client for this backend (made once per resource instance)."""
        if self._client is None:
            if self.backend == "modal":
                self._client = ModalSeparatorClient(self.app_name)
            elif self.backend == "http":
                self._client = HttpSeparatorClient(self.url or "", self.token, timeout_s=self.timeout_s)
            else:
                raise Failure(
                    description=f"Unknown separator backend {self.backend!r}; use one of "
                    f"{', '.join(BACKENDS)} (gpu.backend in config.yaml).",
                    allow_retries=False,
                )
        return self._client

    def _for_local(self, job: SeparationJob) -> SeparationJob:
        return replace(job, device=self.device) if job.device == "auto" and self.device != "auto" else job

    def _for_remote(self, job: SeparationJob) -> SeparationJob:
        if self.backend == "modal" and job.storage.backend == "local":
            raise Failure(
                description=(
                    "The modal separator cannot reach local storage: a Modal container reads inputs from, and "
                    "writes stems to, the bucket. Set storage.backend: s3 (e.g. Cloudflare R2) in config.yaml, "
                    "or use gpu.backend: local or http."
                ),
                allow_retries=False,
            )
        # The worker loads models from its own folder or Demucs' download, not this machine's.
        finish_on = self.finish_on if self.backend == "modal" else "worker"
        return replace(job, model_repo=None, gpu_type=job.gpu_type or self.gpu_type, finish_on=finish_on)

    def price(self, result: SeparationResult) -> float:
        """US$ per hour of the GPU ``result`` ran on (the configured type's price if unknown)."""
        table = {**self.prices_per_hour, self.gpu_type: self.price_per_hour}
        return price_for(result, GpuConfig(type=self.gpu_type, prices_per_hour=table))

    def cost_usd(self, result: SeparationResult) -> float:
        """The whole cost of ``result``: GPU seconds, CPU core-seconds and memory each at its price."""
        return float(self.cost(result)["total_usd"])

    def cost(self, result: SeparationResult) -> dict:
        """:func:`~stemset_assets.core.cost.result_cost`: the cost split by what was used."""
        table = {**self.prices_per_hour, self.gpu_type: self.price_per_hour}
        prices = Prices(gpu_per_hour=table, prices_read=self.prices_read, **self.cost_rates)
        return result_cost(result, prices, self.gpu_type)

    @classmethod
    def from_config(cls, config: StemsetConfig) -> SeparatorResource:
        gpu = config.gpu
        try:
            price = gpu.price_per_hour()
        except Exception:  # an unknown GPU type: cost 0 rather than no definitions at all
            price = 0.0
        return cls(
            backend=gpu.backend,
            gpu_type=gpu.type,
            price_per_hour=price,
            prices_per_hour=dict(gpu.prices_per_hour),
            app_name=gpu.app,
            url=gpu.url or None,
            token=env_or_value(raw_section(config, "gpu").get("token"), gpu.token),
            timeout_s=gpu.timeout_s,
            finish_on=gpu.finish_on,
            cost_rates=_rates(config.cost),
            prices_read=config.cost.prices_read,
        )


def _rates(cost: CostConfig) -> dict[str, float]:
    """The rates of :class:`~stemset_assets.core.cost.Prices` besides the GPU's, from the config's cost section."""
    prices = prices_from_config(cost, GpuConfig())
    return {k: float(v) for k, v in vars(prices).items() if k not in ("gpu_per_hour", "prices_read")}

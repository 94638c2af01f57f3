"""``separator``: the Dagster resource that runs a :class:`~gpu_worker.job.SeparationJob`.

One interface for every backend: :meth:`SeparatorResource.separate` (one job) and
:meth:`SeparatorResource.separate_many` (several; remote backends fan them out). Each returns
the worker's :class:`~gpu_worker.job.SeparationResult` once the stems and their manifest are
published in the media store.

- ``local``: :func:`gpu_worker.worker.run_job` in this process (CPU, or a local CUDA GPU),
  reading and writing through the media store the asset passes in. Cost 0.
- ``modal`` / ``http``: the same job JSON sent to the deployed worker; these arrive with the
  Modal worker issue and fail clearly until then.

Cost: ``billed_seconds x price per hour / 3600`` for remote backends, 0 for local runs
(:meth:`SeparatorResource.cost_usd`, through :mod:`stemset_assets.cost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from dagster import ConfigurableResource, Failure
from pydantic import Field

from gpu_worker.job import SeparationJob, SeparationResult
from gpu_worker.objects import ObjectStore
from stemset_assets.cost import cost_usd, price_per_hour_for

if TYPE_CHECKING:
    from stemset_assets.config import GpuConfig, StemsetConfig

BACKENDS = ("local", "modal", "http")


def price_for(result: SeparationResult, gpu: "GpuConfig") -> float:
    """US$ per hour of the GPU ``result`` ran on (the configured type's price when the table
    does not know it; 0 when it knows neither)."""
    from gpu_worker.errors import ConfigError

    try:
        return price_per_hour_for(result, gpu)
    except ConfigError:
        try:
            return gpu.price_per_hour()
        except ConfigError:
            return 0.0


class SeparatorResource(ConfigurableResource):
    """Where Demucs runs: ``local`` (in-process), ``modal`` or ``http`` (remote GPU workers)."""

    backend: str = Field(default="local", description="local | modal | http")
    gpu_type: str = Field(default="A100-40GB", description="the GPU asked of remote backends; picks the price")
    price_per_hour: float = Field(default=2.50, description="US$ per hour of gpu_type, for cost_usd")
    prices_per_hour: dict[str, float] = Field(default_factory=dict, description="US$ per hour by GPU type")
    device: str = Field(default="auto", description="local backend: auto | cpu | cuda | cuda:N")

    def separate(self, job: SeparationJob, store: ObjectStore) -> SeparationResult:
        """Run one job; ``store`` is the media store (used directly by the local backend)."""
        if self.backend == "local":
            from gpu_worker.worker import run_job  # torch is imported here, not at definitions load

            if job.device == "auto" and self.device != "auto":
                job = replace(job, device=self.device)
            return run_job(job, store=store, backend="local")
        raise self._not_yet()

    def separate_many(self, jobs: Sequence[SeparationJob], store: ObjectStore) -> list[SeparationResult]:
        """Run several jobs (one after another locally; remote backends fan them out)."""
        if self.backend == "local":
            return [self.separate(job, store) for job in jobs]
        raise self._not_yet()

    def price(self, result: SeparationResult) -> float:
        """US$ per hour of the GPU ``result`` ran on (the configured type's price if unknown)."""
        from stemset_assets.config import GpuConfig

        table = {**self.prices_per_hour, self.gpu_type: self.price_per_hour}
        return price_for(result, GpuConfig(type=self.gpu_type, prices_per_hour=table))

    def cost_usd(self, result: SeparationResult) -> float:
        return cost_usd(result, self.price(result))

    def _not_yet(self) -> Failure:
        if self.backend in ("modal", "http"):
            return Failure(
                description=(
                    f"The {self.backend!r} separator backend is not available yet: it arrives with the "
                    "Modal worker issue (deployed Modal class / `stemset worker serve`). Set gpu.backend: "
                    "local in config.yaml to separate in this process meanwhile."
                ),
                allow_retries=False,
            )
        return Failure(description=f"Unknown separator backend {self.backend!r}; use one of {', '.join(BACKENDS)}.",
                       allow_retries=False)

    @classmethod
    def from_config(cls, config: "StemsetConfig") -> "SeparatorResource":
        gpu = config.gpu
        try:
            price = gpu.price_per_hour()
        except Exception:  # an unknown GPU type: cost 0 rather than no definitions at all
            price = 0.0
        return cls(backend=gpu.backend, gpu_type=gpu.type, price_per_hour=price,
                   prices_per_hour=dict(gpu.prices_per_hour))

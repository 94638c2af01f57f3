"""What a separation cost, from the worker's own clock: GPU seconds and CPU seconds, each at its own price.

A result's ``billed_seconds`` is the time the separator device was reserved for the job, measured
by the worker that ran it (in a backlog: its share of the device, ``timings["held"]``; alone:
its whole wall time; plus, for the first job of a Modal container, the container's warm-up), and
``timings["cpu"]`` the process CPU seconds it used. So the figures are the same whichever
process reads them. Prices (config): the GPU type's ``gpu.prices_per_hour``; CPU core-hours and
GiB-hours at ``cost.cpu_per_core_hour`` / ``cost.memory_per_gib_hour``, the date read in
``cost.prices_read``. Modal bills a container's CPU and memory at the higher of reservation and
use, so a Modal job's CPU is ``max(reserved cores x GPU seconds, CPU seconds used)`` and its
memory the reservation over its GPU seconds. An HTTP worker's host is priced by its GPU type's
hourly rate alone (its CPU comes with it). Local runs are priced at ``cost.local_per_hour`` and
``cost.local_cpu_per_core_hour`` (default 0), never at a cloud GPU's price.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpu_worker.errors import ConfigError
from gpu_worker.job import SeparationResult

from ..config import CostConfig, GpuConfig, StemsetConfig

Result = SeparationResult | Mapping[str, Any]


def _field(result: Result, name: str) -> Any:
    return result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)


@dataclass(frozen=True)
class Prices:
    """Every rate a cost needs, in $ per hour (GPU by type, CPU per core, memory per GiB)."""

    gpu_per_hour: Mapping[str, float]
    cpu_per_core_hour: float
    memory_per_gib_hour: float
    container_cpu: float
    container_memory_gib: float
    local_per_hour: float = 0.0
    local_cpu_per_core_hour: float = 0.0
    prices_read: str = ""

    def gpu(self, gpu_type: str | None) -> float:
        if gpu_type in self.gpu_per_hour:
            return float(self.gpu_per_hour[gpu_type])
        folded = {k.lower(): v for k, v in self.gpu_per_hour.items()}
        return float(folded.get(str(gpu_type).lower(), 0.0))


def prices_from_config(cost: CostConfig, gpu: GpuConfig) -> Prices:
    return Prices(
        gpu_per_hour=dict(gpu.prices_per_hour),
        cpu_per_core_hour=cost.cpu_per_core_hour,
        memory_per_gib_hour=cost.memory_per_gib_hour,
        container_cpu=cost.gpu_container_cpu,
        container_memory_gib=cost.gpu_container_memory_gib,
        local_per_hour=cost.local_per_hour,
        local_cpu_per_core_hour=cost.local_cpu_per_core_hour,
        prices_read=cost.prices_read,
    )


def job_cost(
    *,
    gpu_seconds: float,
    cpu_core_seconds: float,
    gpu_type: str | None,
    prices: Prices,
    backend: str = "modal",
    memory_gib: float | None = None,
) -> dict[str, float | str]:
    """``{gpu_usd, cpu_usd, memory_usd, total_usd, gpu_seconds, cpu_core_seconds, ...}``.

    ``backend``: ``modal`` (reserved cores and memory billed over the GPU seconds, or the use
    when higher; ``memory_gib`` overrides the reservation), ``http`` (the GPU host's rate only),
    ``local`` (the local rates), ``bench`` (a benchmark's projection: the Modal prices on the CPU
    seconds actually used and ``memory_gib``, no reservation)."""
    gpu_s, cpu_s = max(0.0, float(gpu_seconds)), max(0.0, float(cpu_core_seconds))
    if backend == "local":
        gpu_rate, cpu_usd, mem_usd = prices.local_per_hour, cpu_s * prices.local_cpu_per_core_hour / 3600, 0.0
    elif backend == "http":
        gpu_rate, cpu_usd, mem_usd = prices.gpu(gpu_type), 0.0, 0.0
    else:
        gpu_rate = prices.gpu(gpu_type)
        billed_cpu = cpu_s if backend == "bench" else max(cpu_s, prices.container_cpu * gpu_s)
        cpu_usd = billed_cpu * prices.cpu_per_core_hour / 3600
        gib = memory_gib if memory_gib is not None else prices.container_memory_gib
        mem_usd = gib * gpu_s * prices.memory_per_gib_hour / 3600
    gpu_usd = gpu_s * gpu_rate / 3600
    return {
        "gpu_seconds": round(gpu_s, 3),
        "cpu_core_seconds": round(cpu_s, 3),
        "gpu_price_per_hour": gpu_rate,
        "gpu_usd": round(gpu_usd, 7),
        "cpu_usd": round(cpu_usd, 7),
        "memory_usd": round(mem_usd, 7),
        "total_usd": round(gpu_usd + cpu_usd + mem_usd, 7),
        "prices_read": prices.prices_read,
    }


def result_cost(result: Result, prices: Prices, default_gpu_type: str | None = None) -> dict[str, float | str]:
    """:func:`job_cost` of a stored result (its backend, GPU type, billed and CPU seconds); a result
    that names no GPU type (a worker without CUDA) is priced as ``default_gpu_type``, the
    configured one, as before."""
    timings = _field(result, "timings") or {}
    backend = _field(result, "backend") or "local"
    return job_cost(
        gpu_seconds=float(_field(result, "billed_seconds") or 0.0),
        cpu_core_seconds=float(timings.get("cpu", 0.0) or 0.0),
        gpu_type=_field(result, "gpu_type") or default_gpu_type,
        prices=prices,
        backend=backend if backend in ("local", "http", "modal") else "modal",
    )


def cost_usd(result: Result, price_per_hour: float) -> float:
    """US$ of ``result``'s GPU seconds alone at ``price_per_hour`` (0 for backend ``local``), rounded
    to 1e-6. The whole cost (CPU and memory too) is :func:`result_cost`.

    >>> round(30 * 2.50 / 3600, 6)  # 30 s on an A100-40GB at $2.50/h
    0.020833
    """
    if (_field(result, "backend") or "local") == "local":
        return 0.0
    seconds = float(_field(result, "billed_seconds") or 0.0)
    return round(max(0.0, seconds) * float(price_per_hour) / 3600.0, 6)


def price_per_hour_for(result: Result, gpu: GpuConfig) -> float:
    """The price of the GPU the result ran on, from a :class:`~stemset_assets.config.GpuConfig`:
    the result's ``gpu_type`` when the worker reported one, else the configured type."""
    return float(gpu.price_per_hour(_field(result, "gpu_type") or None))


def price_for(result: SeparationResult, gpu: GpuConfig) -> float:
    """US$ per hour of the GPU ``result`` ran on (the configured type's price when the table
    does not know it; 0 when it knows neither)."""
    try:
        return price_per_hour_for(result, gpu)
    except ConfigError:
        try:
            return gpu.price_per_hour()
        except ConfigError:
            return 0.0


def config_prices(config: StemsetConfig) -> Prices:
    return prices_from_config(config.cost, config.gpu)


def total_cost_usd(result: Result, config: StemsetConfig) -> float:
    """The whole cost of a result or manifest (GPU, CPU, memory) at ``config``'s prices; a
    document without CPU timings is charged the container's reserved cores (what Modal bills)."""
    return float(result_cost(result, config_prices(config), config.gpu.type)["total_usd"])


def price_per_held_hour(config: StemsetConfig, backend: str | None = None, gpu_type: str | None = None) -> float:
    """US$ per hour a job holds the configured separator: on Modal the GPU plus the cores and
    memory reserved with it, on an HTTP host its GPU rate, locally the local rate (default 0).
    The backfill estimate multiplies its held seconds by this."""
    backend = backend or config.gpu.backend
    hour = job_cost(
        gpu_seconds=3600.0,
        cpu_core_seconds=0.0,
        gpu_type=gpu_type or config.gpu.type,
        prices=config_prices(config),
        backend=backend,
    )
    return float(hour["total_usd"])

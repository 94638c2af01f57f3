"""What a separation cost, from the worker's own clock.

A result's ``billed_seconds`` is measured by the worker that ran the job (model load, separation,
encode, upload, and for the first job of a Modal container the container's warm-up), so the
figure is the same whichever process reads it. Cost = billed seconds x the GPU's price per hour;
local runs cost nothing here (their CPU/GPU seconds are still recorded).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpu_worker.errors import ConfigError
from gpu_worker.job import SeparationResult

from ..config import GpuConfig


def _field(result: SeparationResult | Mapping[str, Any], name: str) -> Any:
    return result.get(name) if isinstance(result, Mapping) else getattr(result, name)


def cost_usd(result: SeparationResult | Mapping[str, Any], price_per_hour: float) -> float:
    """US$ for ``result`` at ``price_per_hour`` (0 for backend ``local``), rounded to 1e-6.

    >>> round(30 * 2.50 / 3600, 6)  # 30 s on an A100-40GB at $2.50/h
    0.020833
    """
    if (_field(result, "backend") or "local") == "local":
        return 0.0
    seconds = float(_field(result, "billed_seconds") or 0.0)
    return round(max(0.0, seconds) * float(price_per_hour) / 3600.0, 6)


def price_per_hour_for(result: SeparationResult | Mapping[str, Any], gpu: GpuConfig) -> float:
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

"""The config's shape: frozen dataclasses, one per section of ``config.yaml``, and the fixed
vocabularies (backends, output formats, name rules, default GPU prices).

Secrets (keys, tokens) are masked in every repr. Imports neither Dagster nor torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpu_worker.errors import ConfigError
from gpu_worker.job import AAC_CODERS, DEFAULT_AAC_CODER  # noqa: F401  (AAC_CODERS re-exported)
from gpu_worker.strategy import Strategy

MODEL_REPO_ENV = "STEMSET_MODEL_REPO"
EMBEDDED_SOURCE = "<embedded default config>"

OUTPUT_FORMATS = ("wav", "flac", "opus", "m4a")
STORAGE_BACKENDS = ("local", "s3")
GPU_BACKENDS = ("local", "modal", "http")
FINISH_ON = ("worker", "cpu_function")
"""Where stems are encoded: beside the GPU, overlapped by the job pipeline (worker, Option B), or
handed to a CPU-only Modal function (cpu_function, Option A). README "Cost" has the measurements."""
DEFAULT_PRICES: dict[str, float] = {
    "T4": 0.59,
    "L4": 0.70,
    "A10G": 1.10,
    "A100-40GB": 2.50,
    "H100": 4.00,
}
"""US$ per hour of each GPU type (Modal's list prices); config.yaml's table is merged over it."""

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""Profile and strategy names: safe as path segments and Dagster asset keys."""
NAME_HINT = "Use lower-case letters, digits and underscores, starting with a letter (at most 64)."


@dataclass(frozen=True)
class OutputSpec:
    """How a profile's stems are encoded. ``bitrate`` (kbit/s) applies to opus and m4a,
    ``aac_coder`` to m4a (see README, "Cost")."""

    format: str = "m4a"
    bitrate: int = 192
    aac_coder: str = DEFAULT_AAC_CODER


@dataclass(frozen=True)
class Profile:
    """A folder of inputs (``inputs/<name>/``) and the strategies run on each new one."""

    name: str
    description: str
    strategies: tuple[str, ...]
    output: OutputSpec = field(default_factory=OutputSpec)


@dataclass(frozen=True)
class LocalStorage:
    root: Path


def _secret(value: str | None) -> str:
    return "None" if value is None else "'***'"


SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key", "token"})


def _masked_repr(self) -> str:
    """A dataclass repr with every field in SECRET_FIELDS masked: secrets are never printed."""
    parts = (
        f"{f.name}={_secret(getattr(self, f.name)) if f.name in SECRET_FIELDS else repr(getattr(self, f.name))}"
        for f in fields(self)
    )
    return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, kw_only=True)
class S3Storage:
    """An S3-compatible bucket. ``None`` credentials mean boto3's own credential chain."""

    endpoint_url: str | None
    bucket: str
    region: str = "auto"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    public_url: str | None = None

    __repr__ = __str__ = _masked_repr  # credentials masked, never printed


@dataclass(frozen=True)
class StorageConfig:
    backend: str
    local: LocalStorage
    s3: S3Storage | None = None  # set only when backend is "s3"


@dataclass(frozen=True)
class GpuConfig:
    backend: str = "local"
    type: str = "A100-40GB"
    app: str = "stemset-gpu"
    url: str | None = None
    token: str | None = field(default=None, repr=False)
    prices_per_hour: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    timeout_s: float = 1800.0
    finish_on: str = "worker"

    def price_per_hour(self, gpu_type: str | None = None) -> float:
        """US$ per hour of ``gpu_type`` (default: the configured type)."""
        gpu_type = self.type if gpu_type is None else gpu_type
        if gpu_type in self.prices_per_hour:
            return float(self.prices_per_hour[gpu_type])
        folded = {k.lower(): v for k, v in self.prices_per_hour.items()}
        if str(gpu_type).lower() in folded:
            return float(folded[str(gpu_type).lower()])
        raise ConfigError(
            f"No price for GPU type {gpu_type!r} (known: {', '.join(self.prices_per_hour)}).",
            f"Add it to gpu.prices_per_hour in config.yaml, e.g. `{gpu_type}: 1.50` ($ per hour).",
        )

    __repr__ = __str__ = _masked_repr  # token masked, never printed


@dataclass(frozen=True)
class ModelsConfig:
    repo: Path | None = None  # a Demucs local repo folder; None = Demucs' own download


@dataclass(frozen=True)
class AutoReprocess:
    """Opt-in re-runs of one strategy's stale stem sets by the ``auto_reprocess`` sensor."""

    enabled: bool = False
    max_per_tick: int = 5  # runs requested per tick at most
    daily_cost_ceiling_usd: float = 10.0  # estimated US$ requested per UTC day at most


@dataclass(frozen=True)
class SensorsConfig:
    max_new_per_tick: int = 200  # new inputs the new_recordings sensor takes on per tick
    interval_s: int = 30  # seconds between sensor ticks
    settle_s: int = 30  # an input modified more recently counts as an upload in progress
    auto_reprocess: dict[str, AutoReprocess] = field(default_factory=dict)  # by strategy name


@dataclass(frozen=True)
class BackfillConfig:
    billed_seconds_per_audio_second: float = 0.1  # cost estimate before any recorded run on this backend
    max_partitions_per_run: int = 10  # a Dagster backfill groups this many partitions' stems per run


@dataclass(frozen=True)
class RunsConfig:
    """The production run queue and its safety nets (``deploy/dagster.yaml``, ``stemset deploy render``)."""

    max_concurrent: int = 20  # runs in progress at once, of any kind
    gpu_concurrency: int = 4  # runs that separate (tag stemset/gpu) in progress at once
    max_retries: int = 2  # a failed run is retried this many times by the daemon
    start_timeout_s: int = 300  # a run not started after this long is marked failed by run monitoring
    cancel_timeout_s: int = 180  # a run still canceling after this long is marked canceled
    max_runtime_s: int = 0  # a run going longer is canceled by run monitoring; 0 = no limit


@dataclass(frozen=True)
class BudgetConfig:
    """What separating may spend (US$; None = no limit). Sensors and backfills launch only what fits."""

    gpu_usd_per_day: float | None = None  # per UTC day
    gpu_usd_per_month: float | None = None  # per UTC calendar month

    @property
    def limited(self) -> bool:
        return self.gpu_usd_per_day is not None or self.gpu_usd_per_month is not None


@dataclass(frozen=True)
class CostConfig:
    """Prices of what a job uses besides the GPU (list prices, with the date they were read), the
    cores and memory reserved with each GPU container (billed whether used or not), and the rate
    at which a local run's seconds are counted (default 0: the machine is already paid for)."""

    prices_read: str = "2026-06-27"
    cpu_per_core_hour: float = 0.0472  # Modal: $0.0000131 per physical core per second
    memory_per_gib_hour: float = 0.0080  # Modal: $0.00000222 per GiB per second
    gpu_container_cpu: float = 24.0  # physical cores reserved with a GPU container (Modal cpu=)
    gpu_container_memory_gib: float = 16.0  # memory reserved with it (Modal memory=)
    local_per_hour: float = 0.0  # a local run's device-hour
    local_cpu_per_core_hour: float = 0.0  # a local run's CPU core-hour


@dataclass(frozen=True)
class ApiConfig:
    """The web API (`stemset api serve`): bearer ``token``; ``auth: false`` turns auth off
    (local use only: the server then binds only to loopback); uploads up to ``max_upload_mb``;
    media URLs start with ``public_url`` (never with the request's Host header)."""

    token: str | None = field(default=None, repr=False)
    auth: bool = True
    max_upload_mb: int = 500
    public_url: str | None = None  # where clients reach the API; media URLs start with it (else root-relative)

    __repr__ = __str__ = _masked_repr  # token masked, never printed


@dataclass(frozen=True)
class DagsterConfig:
    webserver_url: str | None = None  # a running dagster-webserver: runs launch through its GraphQL


@dataclass(frozen=True)
class StemsetConfig:
    path: Path | None  # the file read (absolute); None for the embedded default
    storage: StorageConfig
    gpu: GpuConfig
    models: ModelsConfig
    sensors: SensorsConfig
    profiles: dict[str, Profile]
    strategies: dict[str, Strategy]
    strategy_trees: dict[str, dict]  # each strategy as written (after ${VAR} substitution)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    dagster: DagsterConfig = field(default_factory=DagsterConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def source(self) -> str:
        """How errors name this config: the file's path, or the embedded default."""
        return str(self.path) if self.path is not None else EMBEDDED_SOURCE

    def strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{self.source}: no strategy named {name!r} under strategies (known: {names_of(self.strategies)})."
            ) from None

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{self.source}: no profile named {name!r} under profiles (known: {names_of(self.profiles)})."
            ) from None


def names_of(mapping: Mapping[str, Any]) -> str:
    return ", ".join(mapping) if mapping else "none"

"""Stemset's typed config: ``config.yaml`` read into frozen dataclasses.

The file is found through ``--config``, else ``$STEMSET_CONFIG``, else ``./config.yaml``;
when none was named and ``./config.yaml`` is absent, the embedded default (the shipped
``config.yaml``) is used, so ``stemset`` works in any folder.

String values may use ``${VAR}`` and ``${VAR:-default}``. Substitution runs on the parsed
values (a ``$`` in a comment is harmless) and only where a value is used: the
``storage.s3`` block is read only when ``storage.backend`` is ``s3``, and ``gpu.url`` /
``gpu.token`` need their variables only when ``gpu.backend`` is ``http``.

Every error is a :class:`ConfigError` naming the file and the key path, e.g.
``config.yaml: gpu.backend must be one of local, modal, http (got 'cuda')``.

This module imports neither Dagster nor torch.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from gpu_worker.errors import ConfigError, StrategyError
from gpu_worker.strategy import Strategy, parse_strategy

CONFIG_ENV = "STEMSET_CONFIG"
MODEL_REPO_ENV = "STEMSET_MODEL_REPO"
DEFAULT_CONFIG_NAME = "config.yaml"
EMBEDDED_SOURCE = "<embedded default config>"

DEFAULT_CONFIG_YAML: str = (
    resources.files("stemset_assets").joinpath("default_config.yaml").read_text(encoding="utf-8")
)
"""The shipped ``config.yaml``, used when no config file is named and none is in the CWD."""

OUTPUT_FORMATS = ("wav", "flac", "opus", "m4a")
STORAGE_BACKENDS = ("local", "s3")
GPU_BACKENDS = ("local", "modal", "http")
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
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

_KEYS = {
    "storage": ("backend", "local", "s3"),
    "storage.local": ("root",),
    "storage.s3": ("endpoint_url", "bucket", "region", "access_key_id", "secret_access_key", "public_url"),
    "gpu": ("backend", "type", "app", "url", "token", "prices_per_hour", "timeout_s"),
    "models": ("repo",),
    "sensors": ("max_new_per_tick", "interval_s", "settle_s", "auto_reprocess"),
    "auto_reprocess": ("enabled", "max_per_tick", "daily_cost_ceiling_usd"),
    "backfill": ("billed_seconds_per_audio_second", "max_partitions_per_run"),
    "api": ("token", "auth", "max_upload_mb"),
    "dagster": ("webserver_url",),
    "profile": ("description", "strategies", "output"),
    "output": ("format", "bitrate"),
}


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class OutputSpec:
    """How a profile's stems are encoded. ``bitrate`` (kbit/s) applies to opus and m4a."""

    format: str = "m4a"
    bitrate: int = 192


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
    parts = (f"{f.name}={_secret(getattr(self, f.name)) if f.name in SECRET_FIELDS else repr(getattr(self, f.name))}"
             for f in fields(self))
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
class ApiConfig:
    """The web API (`stemset api serve`): bearer ``token``; ``auth: false`` turns auth off
    (local use only: the server then binds only to loopback); uploads up to ``max_upload_mb``."""

    token: str | None = field(default=None, repr=False)
    auth: bool = True
    max_upload_mb: int = 500

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
    api: ApiConfig = field(default_factory=ApiConfig)
    dagster: DagsterConfig = field(default_factory=DagsterConfig)

    @property
    def source(self) -> str:
        """How errors name this config: the file's path, or the embedded default."""
        return str(self.path) if self.path is not None else EMBEDDED_SOURCE

    def strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{self.source}: no strategy named {name!r} under strategies "
                f"(known: {_names(self.strategies)})."
            ) from None

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{self.source}: no profile named {name!r} under profiles "
                f"(known: {_names(self.profiles)})."
            ) from None


def _names(mapping: Mapping[str, Any]) -> str:
    return ", ".join(mapping) if mapping else "none"


# --------------------------------------------------------------------------- finding and loading


def resolve_config_path(cli_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``--config`` value, else ``$STEMSET_CONFIG``, else ``./config.yaml`` (existing or not)."""
    return _resolve(cli_path, os.environ if env is None else env)[0]


def _resolve(cli_path: Any, env: Mapping[str, str]) -> tuple[Path, str | None]:
    """The path and what named it (``--config``, ``STEMSET_CONFIG`` or None for the default)."""
    if cli_path is not None and str(cli_path) != "":
        return Path(cli_path).expanduser(), "--config"
    from_env = env.get(CONFIG_ENV)
    if from_env:
        return Path(from_env).expanduser(), CONFIG_ENV
    return Path(DEFAULT_CONFIG_NAME), None


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> StemsetConfig:
    """Read the config named by ``path`` (``--config``), ``$STEMSET_CONFIG`` or ``./config.yaml``.

    With nothing named and no ``./config.yaml``, the embedded default is used. A named file
    that does not exist is an error.
    """
    env = os.environ if env is None else env
    resolved, origin = _resolve(path, env)
    if not resolved.exists():
        if origin is None:
            return parse_config(DEFAULT_CONFIG_YAML, env=env)
        raise ConfigError(
            f"Config file {resolved} (from {origin}) does not exist.",
            f"Check the path, or drop {origin} to use ./config.yaml or the built-in defaults.",
        )
    if not resolved.is_file():
        raise ConfigError(f"Config file {resolved} is not a file.")
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {resolved} could not be read: {exc}.") from exc
    return parse_config(text, path=resolved, env=env)


def parse_config(
    text: str,
    *,
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> StemsetConfig:
    """Parse config text. ``path`` names the file in errors and anchors relative paths
    (else ``base_dir``, else the CWD); without ``path`` the text counts as the embedded default."""
    source = str(path) if path is not None else EMBEDDED_SOURCE
    abs_path = Path(path).expanduser().absolute() if path is not None else None
    if abs_path is not None:
        anchor = abs_path.parent
    else:
        anchor = Path(base_dir).expanduser().absolute() if base_dir is not None else Path.cwd()
    reader = _Reader(source, anchor, os.environ if env is None else env)
    return reader.read(_parse_yaml(text, source), abs_path)


# --------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        hint = (
            "Each key may appear once in a mapping: remove or rename one."
            if "duplicate key" in str(problem)
            else "Check indentation and quoting there (values with ': ' or '#' need quotes)."
        )
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}.", hint) from None
    if data is None:
        raise ConfigError(
            f"{source}: the file is empty.",
            "Start from the shipped config.yaml (profiles, strategies, storage, gpu).",
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"(storage, gpu, models, sensors, backfill, profiles, strategies), got {type(data).__name__}."
        )
    return data


# --------------------------------------------------------------------------- reading sections


class _Missing(Exception):
    def __init__(self, name: str, path: str = ""):
        self.name = name
        self.path = path


class _Reader:
    """Turns the parsed tree into dataclasses, substituting variables section by section."""

    def __init__(self, source: str, anchor: Path, env: Mapping[str, str]):
        self.source = source
        self.anchor = anchor
        self.env = env

    # ----- helpers

    def error(self, path: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {path} {message}", hint)

    def substitute(self, value: Any, path: str, required: bool = True) -> Any:
        """``${VAR}`` / ``${VAR:-default}`` in every string of ``value``. With
        ``required=False`` a missing variable yields None instead of an error."""
        try:
            return self._substitute(value, path)
        except _Missing as missing:
            if not required:
                return None
            raise self.error(
                missing.path,
                f"uses ${{{missing.name}}}, but the environment variable {missing.name} is not set.",
                f"Export {missing.name}, or write ${{{missing.name}:-default}} in the file to give it a default.",
            ) from None

    def _substitute(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self._substitute_text(value, path)
        if isinstance(value, dict):
            return {k: self._substitute(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self._substitute(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    def _substitute_text(self, text: str, path: str) -> str:
        if "${" not in text:
            return text
        if "${" in _VAR.sub("", text):
            raise self.error(
                path,
                f"has a malformed variable reference in {text!r}.",
                "Write ${NAME} or ${NAME:-default}; NAME is letters, digits and underscores.",
            )

        def one(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if default is not None:
                return value if value else default
            if value is None:
                raise _Missing(name, path)
            return value

        return _VAR.sub(one, text)

    def section(self, raw: Any, path: str, keys: tuple[str, ...]) -> dict:
        """A mapping whose keys are checked against ``keys`` (catches typos); None = empty."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error(path, f"must be a mapping with keys {', '.join(keys)} (got {type(raw).__name__}).")
        for key in raw:
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f"Did you mean {close[0]!r}?" if close else None
                raise self.error(f"{path}.{key}", f"is not a known key (allowed: {', '.join(keys)}).", hint)
        return raw

    def get(self, sec: dict, key: str, path: str, default: Any = None, required: bool = True) -> Any:
        value = sec.get(key)
        if value is None:
            return default
        return self.substitute(value, f"{path}.{key}", required=required)

    def text(self, value: Any, path: str, *, optional: bool = False) -> str | None:
        if value is None:
            if optional:
                return None
            raise self.error(path, "is required.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(path, f"must be text (got {type(value).__name__}).")
        value = str(value).strip()
        if not value:
            if optional:
                return None
            raise self.error(path, "must not be empty.")
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)} (got {value!r}).")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(path, f"must be a whole number from {lo} to {hi} (got {value!r}).")
        return value

    def number(self, value: Any, path: str, lo: float, what: str = "a number") -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
            raise self.error(path, f"must be {what} >= {lo:g} (got {value!r}).")
        return float(value)

    def url(self, value: Any, path: str, *, optional: bool) -> str | None:
        text = self.text(value, path, optional=optional)
        if text is None:
            return None
        if not re.match(r"^https?://[^/\s]+", text):
            raise self.error(path, f"must be an http:// or https:// URL (got {text!r}).")
        return text.rstrip("/")

    def local_path(self, text: str, anchor: Path) -> Path:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = anchor / path
        return Path(os.path.normpath(path))

    # ----- sections

    def read(self, data: dict, path: Path | None) -> StemsetConfig:
        strategies, trees = self.read_strategies(data.get("strategies"))
        return StemsetConfig(
            path=path,
            storage=self.read_storage(data.get("storage")),
            gpu=self.read_gpu(data.get("gpu")),
            models=self.read_models(data.get("models")),
            sensors=self.read_sensors(data.get("sensors"), strategies),
            profiles=self.read_profiles(data.get("profiles"), strategies),
            strategies=strategies,
            strategy_trees=trees,
            api=self.read_api(data.get("api")),
            dagster=self.read_dagster(data.get("dagster")),
            backfill=self.read_backfill(data.get("backfill")),
        )

    def read_storage(self, raw: Any) -> StorageConfig:
        sec = self.section(raw, "storage", _KEYS["storage"])
        backend = self.choice(self.get(sec, "backend", "storage", "local"), "storage.backend", STORAGE_BACKENDS)
        local_sec = self.section(sec.get("local"), "storage.local", _KEYS["storage.local"])
        root = self.text(self.get(local_sec, "root", "storage.local", "./media"), "storage.local.root")
        local = LocalStorage(root=self.local_path(root, self.anchor))
        s3_sec = self.section(sec.get("s3"), "storage.s3", _KEYS["storage.s3"])  # typos caught even if unused
        s3 = None
        if backend == "s3":
            if not s3_sec:
                raise self.error(
                    "storage.s3", "is required when storage.backend is s3.",
                    "Add the s3 block (endpoint_url, bucket, access_key_id, secret_access_key).",
                )
            s3 = self.read_s3(s3_sec)
        return StorageConfig(backend=backend, local=local, s3=s3)

    def read_s3(self, sec: dict) -> S3Storage:
        p = "storage.s3"
        bucket = self.text(self.get(sec, "bucket", p), f"{p}.bucket")
        if not _BUCKET.match(bucket) or ".." in bucket or re.fullmatch(r"[\d.]+", bucket):
            raise self.error(
                f"{p}.bucket",
                f"{bucket!r} is not a valid bucket name.",
                "Use 3-63 lower-case letters, digits, '-' or '.', starting and ending with a letter or digit.",
            )
        return S3Storage(
            endpoint_url=self.url(self.get(sec, "endpoint_url", p), f"{p}.endpoint_url", optional=True),
            bucket=bucket,
            region=self.text(self.get(sec, "region", p, "auto"), f"{p}.region"),
            access_key_id=self.text(self.get(sec, "access_key_id", p), f"{p}.access_key_id", optional=True),
            secret_access_key=self.text(
                self.get(sec, "secret_access_key", p), f"{p}.secret_access_key", optional=True
            ),
            public_url=self.url(self.get(sec, "public_url", p), f"{p}.public_url", optional=True),
        )

    def read_gpu(self, raw: Any) -> GpuConfig:
        sec = self.section(raw, "gpu", _KEYS["gpu"])
        backend = self.choice(self.get(sec, "backend", "gpu", "local"), "gpu.backend", GPU_BACKENDS)
        http = backend == "http"
        gpu_type = self.text(self.get(sec, "type", "gpu", "A100-40GB"), "gpu.type")
        app = self.text(self.get(sec, "app", "gpu", "stemset-gpu"), "gpu.app")
        # url and token matter only to the http backend; elsewhere an unset variable is no error.
        url = self.url(self.get(sec, "url", "gpu", required=http), "gpu.url", optional=True)
        token = self.text(self.get(sec, "token", "gpu", required=http), "gpu.token", optional=True)
        if http and url is None:
            raise self.error(
                "gpu.url", "is required when gpu.backend is http.",
                "Set it to the worker's base URL (e.g. export GPU_WORKER_URL=https://gpu.example.com).",
            )
        prices = dict(DEFAULT_PRICES)
        raw_prices = self.get(sec, "prices_per_hour", "gpu", {})
        if not isinstance(raw_prices, dict):
            raise self.error("gpu.prices_per_hour", "must be a mapping of GPU type to $ per hour, e.g. {A100-40GB: 2.50}.")
        for name, price in raw_prices.items():
            prices[str(name)] = self.number(price, f"gpu.prices_per_hour.{name}", 0, "a price in $ per hour")
        timeout = self.number(self.get(sec, "timeout_s", "gpu", 1800.0), "gpu.timeout_s", 1, "seconds")
        gpu = GpuConfig(
            backend=backend, type=gpu_type, app=app, url=url, token=token,
            prices_per_hour=prices, timeout_s=timeout,
        )
        if backend != "local":  # remote runs are billed: their GPU type needs a price
            try:
                gpu.price_per_hour()
            except ConfigError:
                raise self.error(
                    "gpu.type", f"{gpu_type!r} has no price in gpu.prices_per_hour (known: {', '.join(prices)}).",
                    f"Add `{gpu_type}: <$ per hour>` to gpu.prices_per_hour, or pick a known type.",
                ) from None
        return gpu

    def read_models(self, raw: Any) -> ModelsConfig:
        sec = self.section(raw, "models", _KEYS["models"])
        if MODEL_REPO_ENV in self.env:  # the environment overrides the file
            where, value, anchor = f"models.repo (from ${MODEL_REPO_ENV})", self.env[MODEL_REPO_ENV], Path.cwd()
        else:
            where, value, anchor = "models.repo", self.get(sec, "repo", "models"), self.anchor
        text = self.text(value, where, optional=True)
        if text is None:
            return ModelsConfig(repo=None)
        repo = self.local_path(text, anchor)
        if not repo.is_dir():
            raise self.error(
                where,
                f"is {repo}, which is not an existing folder.",
                f"Point models.repo or {MODEL_REPO_ENV} at a Demucs model folder (the model's `.th` "
                f"files and its bag `.yaml`), or leave both empty to use Demucs' own download.",
            )
        return ModelsConfig(repo=repo)

    def read_sensors(self, raw: Any, strategies: Mapping[str, Strategy]) -> SensorsConfig:
        sec = self.section(raw, "sensors", _KEYS["sensors"])
        auto_raw = self.get(sec, "auto_reprocess", "sensors", {})
        if not isinstance(auto_raw, dict):
            raise self.error("sensors.auto_reprocess", "must be a mapping of strategy name to "
                             "{enabled, max_per_tick, daily_cost_ceiling_usd}.")
        auto: dict[str, AutoReprocess] = {}
        for name, body in auto_raw.items():
            p = f"sensors.auto_reprocess.{name}"
            if name not in strategies:
                raise self.error(p, f"names unknown strategy {name!r} (known: {_names(strategies)}).",
                                 "Use a strategy name defined under strategies.")
            item = self.section(body, p, _KEYS["auto_reprocess"])
            enabled = self.get(item, "enabled", p, False)
            if not isinstance(enabled, bool):
                if str(enabled).strip().lower() not in ("true", "false"):
                    raise self.error(f"{p}.enabled", f"must be true or false (got {enabled!r}).")
                enabled = str(enabled).strip().lower() == "true"
            auto[name] = AutoReprocess(
                enabled=enabled,
                max_per_tick=self.integer(self.get(item, "max_per_tick", p, 5), f"{p}.max_per_tick", 1, 10_000),
                daily_cost_ceiling_usd=self.number(self.get(item, "daily_cost_ceiling_usd", p, 10.0),
                                                   f"{p}.daily_cost_ceiling_usd", 0, "an amount in US$"),
            )
        return SensorsConfig(
            max_new_per_tick=self.integer(
                self.get(sec, "max_new_per_tick", "sensors", 200), "sensors.max_new_per_tick", 1, 100_000
            ),
            interval_s=self.integer(self.get(sec, "interval_s", "sensors", 30), "sensors.interval_s", 1, 86_400),
            settle_s=self.integer(self.get(sec, "settle_s", "sensors", 30), "sensors.settle_s", 0, 86_400),
            auto_reprocess=auto,
        )

    def read_backfill(self, raw: Any) -> BackfillConfig:
        sec = self.section(raw, "backfill", _KEYS["backfill"])
        return BackfillConfig(
            billed_seconds_per_audio_second=self.number(
                self.get(sec, "billed_seconds_per_audio_second", "backfill", 0.1),
                "backfill.billed_seconds_per_audio_second", 0, "seconds per audio second",
            ),
            max_partitions_per_run=self.integer(
                self.get(sec, "max_partitions_per_run", "backfill", 10), "backfill.max_partitions_per_run", 1, 1000),
        )

    def read_api(self, raw: Any) -> ApiConfig:
        sec = self.section(raw, "api", _KEYS["api"])
        auth = self.get(sec, "auth", "api", True)
        if isinstance(auth, str) and auth.strip().lower() in ("true", "false"):
            auth = auth.strip().lower() == "true"
        if not isinstance(auth, bool):
            raise self.error("api.auth", f"must be true or false (got {auth!r}).")
        return ApiConfig(
            token=self.text(self.get(sec, "token", "api", required=False), "api.token", optional=True),
            auth=auth,
            max_upload_mb=self.integer(self.get(sec, "max_upload_mb", "api", 500), "api.max_upload_mb", 1, 100_000),
        )

    def read_dagster(self, raw: Any) -> DagsterConfig:
        sec = self.section(raw, "dagster", _KEYS["dagster"])
        url = self.url(self.get(sec, "webserver_url", "dagster"), "dagster.webserver_url", optional=True)
        return DagsterConfig(webserver_url=url)

    def check_name(self, name: Any, path: str, what: str) -> str:
        if not isinstance(name, str) or not NAME.match(name):
            raise self.error(
                path, f"{what} name {name!r} is not usable as a path segment and Dagster key.", NAME_HINT
            )
        return name

    def read_strategies(self, raw: Any) -> tuple[dict[str, Strategy], dict[str, dict]]:
        if raw is None:
            return {}, {}
        if not isinstance(raw, dict):
            raise self.error("strategies", f"must be a mapping of strategy name to tree (got {type(raw).__name__}).")
        strategies: dict[str, Strategy] = {}
        trees: dict[str, dict] = {}
        for name, tree in raw.items():
            self.check_name(name, f"strategies.{name}", "strategy")
            tree = self.substitute(tree, f"strategies.{name}")
            try:
                strategies[name] = parse_strategy(name, tree, where="strategies")
            except StrategyError as exc:
                raise ConfigError(f"{self.source}: {exc.message}", exc.hint) from None
            trees[name] = tree
        return strategies, trees

    def read_profiles(self, raw: Any, strategies: Mapping[str, Strategy]) -> dict[str, Profile]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error("profiles", f"must be a mapping of profile name to settings (got {type(raw).__name__}).")
        profiles: dict[str, Profile] = {}
        for name, body in raw.items():
            p = f"profiles.{name}"
            self.check_name(name, p, "profile")
            sec = self.section(body, p, _KEYS["profile"])
            description = self.text(self.get(sec, "description", p, ""), f"{p}.description", optional=True) or ""
            listed = self.get(sec, "strategies", p, [])
            if isinstance(listed, str):
                listed = [listed]
            if not isinstance(listed, list):
                raise self.error(f"{p}.strategies", f"must be a list of strategy names (got {type(listed).__name__}).")
            names: list[str] = []
            for i, item in enumerate(listed):
                if not isinstance(item, str) or item not in strategies:
                    raise self.error(
                        f"{p}.strategies[{i}]",
                        f"names unknown strategy {item!r} (known: {_names(strategies)}).",
                        "Define it under strategies, or fix the name.",
                    )
                if item in names:
                    raise self.error(f"{p}.strategies[{i}]", f"lists {item!r} twice.")
                names.append(item)
            out = self.section(sec.get("output"), f"{p}.output", _KEYS["output"])
            output = OutputSpec(
                format=self.choice(self.get(out, "format", f"{p}.output", "m4a"), f"{p}.output.format", OUTPUT_FORMATS),
                bitrate=self.integer(self.get(out, "bitrate", f"{p}.output", 192), f"{p}.output.bitrate", 32, 512),
            )
            profiles[name] = Profile(name=name, description=description, strategies=tuple(names), output=output)
        return profiles

"""Reading each section of ``config.yaml`` into its dataclass (:mod:`.schema`).

Substitution happens only where a value is used: the ``storage.s3`` block is read only when
``storage.backend`` is ``s3``, and ``gpu.url`` / ``gpu.token`` need their variables only when
``gpu.backend`` is ``http``. Unknown keys are errors that name them (with a close match).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpu_worker.errors import ConfigError, StrategyError
from gpu_worker.strategy import Strategy, parse_strategy

from .schema import (
    AAC_CODERS,
    DEFAULT_AAC_CODER,
    DEFAULT_PRICES,
    FINISH_ON,
    GPU_BACKENDS,
    MODEL_REPO_ENV,
    NAME,
    NAME_HINT,
    OUTPUT_FORMATS,
    STORAGE_BACKENDS,
    ApiConfig,
    AutoReprocess,
    BackfillConfig,
    BudgetConfig,
    CostConfig,
    DagsterConfig,
    GpuConfig,
    LocalStorage,
    ModelsConfig,
    OutputSpec,
    Profile,
    RunsConfig,
    S3Storage,
    SensorsConfig,
    StemsetConfig,
    StorageConfig,
    names_of,
)
from .values import ValueReader

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

TOP_LEVEL = (
    "storage",
    "gpu",
    "models",
    "sensors",
    "backfill",
    "runs",
    "budget",
    "cost",
    "api",
    "dagster",
    "profiles",
    "strategies",
)

_KEYS = {
    "storage": ("backend", "local", "s3"),
    "storage.local": ("root",),
    "storage.s3": ("endpoint_url", "bucket", "region", "access_key_id", "secret_access_key", "public_url"),
    "gpu": ("backend", "type", "app", "url", "token", "prices_per_hour", "timeout_s", "finish_on"),
    "models": ("repo",),
    "sensors": ("max_new_per_tick", "interval_s", "settle_s", "auto_reprocess"),
    "auto_reprocess": ("enabled", "max_per_tick", "daily_cost_ceiling_usd"),
    "backfill": ("billed_seconds_per_audio_second", "max_partitions_per_run"),
    "cost": (
        "prices_read",
        "cpu_per_core_hour",
        "memory_per_gib_hour",
        "gpu_container_cpu",
        "gpu_container_memory_gib",
        "local_per_hour",
        "local_cpu_per_core_hour",
    ),
    "api": ("token", "auth", "max_upload_mb", "public_url"),
    "dagster": ("webserver_url",),
    "runs": (
        "max_concurrent",
        "gpu_concurrency",
        "max_retries",
        "start_timeout_s",
        "cancel_timeout_s",
        "max_runtime_s",
    ),
    "budget": ("gpu_usd_per_day", "gpu_usd_per_month"),
    "profile": ("description", "strategies", "output"),
    "output": ("format", "bitrate", "aac_coder"),
}


class SectionReader(ValueReader):
    """Turns the parsed tree into :class:`StemsetConfig`, section by section."""

    def read(self, data: dict, path: Path | None) -> StemsetConfig:
        for key in data:  # a misspelt section (`storag:`) must not silently mean the defaults
            if key not in TOP_LEVEL and not str(key).startswith("x-"):  # x-...: a home for YAML anchors
                raise self.unknown_key(str(key), key, TOP_LEVEL, "the top level")
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
            runs=self.read_runs(data.get("runs")),
            budget=self.read_budget(data.get("budget")),
            cost=self.read_cost(data.get("cost")),
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
                    "storage.s3",
                    "is required when storage.backend is s3.",
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
            secret_access_key=self.text(self.get(sec, "secret_access_key", p), f"{p}.secret_access_key", optional=True),
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
                "gpu.url",
                "is required when gpu.backend is http.",
                "Set it to the worker's base URL (e.g. export GPU_WORKER_URL=https://gpu.example.com).",
            )
        prices = dict(DEFAULT_PRICES)
        raw_prices = self.get(sec, "prices_per_hour", "gpu", {})
        if not isinstance(raw_prices, dict):
            raise self.error(
                "gpu.prices_per_hour", "must be a mapping of GPU type to $ per hour, e.g. {A100-40GB: 2.50}."
            )
        for name, price in raw_prices.items():
            prices[str(name)] = self.number(price, f"gpu.prices_per_hour.{name}", 0, "a price in $ per hour")
        timeout = self.number(self.get(sec, "timeout_s", "gpu", 1800.0), "gpu.timeout_s", 1, "seconds")
        finish_on = self.choice(self.get(sec, "finish_on", "gpu", "worker"), "gpu.finish_on", FINISH_ON)
        gpu = GpuConfig(
            backend=backend,
            type=gpu_type,
            app=app,
            url=url,
            token=token,
            prices_per_hour=prices,
            timeout_s=timeout,
            finish_on=finish_on,
        )
        if backend != "local":  # remote runs are billed: their GPU type needs a price
            try:
                gpu.price_per_hour()
            except ConfigError:
                raise self.error(
                    "gpu.type",
                    f"{gpu_type!r} has no price in gpu.prices_per_hour (known: {', '.join(prices)}).",
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
            raise self.error(
                "sensors.auto_reprocess",
                "must be a mapping of strategy name to {enabled, max_per_tick, daily_cost_ceiling_usd}.",
            )
        auto: dict[str, AutoReprocess] = {}
        for name, body in auto_raw.items():
            p = f"sensors.auto_reprocess.{name}"
            if name not in strategies:
                raise self.error(
                    p,
                    f"names unknown strategy {name!r} (known: {names_of(strategies)}).",
                    "Use a strategy name defined under strategies.",
                )
            item = self.section(body, p, _KEYS["auto_reprocess"])
            enabled = self.get(item, "enabled", p, False)
            if not isinstance(enabled, bool):
                if str(enabled).strip().lower() not in ("true", "false"):
                    raise self.error(f"{p}.enabled", f"must be true or false (got {enabled!r}).")
                enabled = str(enabled).strip().lower() == "true"
            auto[name] = AutoReprocess(
                enabled=enabled,
                max_per_tick=self.integer(self.get(item, "max_per_tick", p, 5), f"{p}.max_per_tick", 1, 10_000),
                daily_cost_ceiling_usd=self.number(
                    self.get(item, "daily_cost_ceiling_usd", p, 10.0),
                    f"{p}.daily_cost_ceiling_usd",
                    0,
                    "an amount in US$",
                ),
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
                "backfill.billed_seconds_per_audio_second",
                0,
                "seconds per audio second",
            ),
            max_partitions_per_run=self.integer(
                self.get(sec, "max_partitions_per_run", "backfill", 10), "backfill.max_partitions_per_run", 1, 1000
            ),
        )

    def read_runs(self, raw: Any) -> RunsConfig:
        sec = self.section(raw, "runs", _KEYS["runs"])
        d = RunsConfig()

        def whole(key: str, lo: int, hi: int) -> int:
            return self.integer(self.get(sec, key, "runs", getattr(d, key)), f"runs.{key}", lo, hi)

        return RunsConfig(
            max_concurrent=whole("max_concurrent", 1, 10_000),
            gpu_concurrency=whole("gpu_concurrency", 1, 10_000),
            max_retries=whole("max_retries", 0, 10),
            start_timeout_s=whole("start_timeout_s", 10, 86_400),
            cancel_timeout_s=whole("cancel_timeout_s", 10, 86_400),
            max_runtime_s=whole("max_runtime_s", 0, 7 * 86_400),
        )

    def read_budget(self, raw: Any) -> BudgetConfig:
        sec = self.section(raw, "budget", _KEYS["budget"])

        def amount(key: str) -> float | None:  # empty (or unset) = no limit
            value = self.get(sec, key, "budget", None, required=False)
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            return self.number(value, f"budget.{key}", 0, "an amount in US$ (empty for no limit)")

        return BudgetConfig(gpu_usd_per_day=amount("gpu_usd_per_day"), gpu_usd_per_month=amount("gpu_usd_per_month"))

    def read_cost(self, raw: Any) -> CostConfig:
        sec = self.section(raw, "cost", _KEYS["cost"])
        d = CostConfig()

        def num(key: str, what: str) -> float:
            return self.number(self.get(sec, key, "cost", getattr(d, key)), f"cost.{key}", 0, what)

        return CostConfig(
            prices_read=str(self.get(sec, "prices_read", "cost", d.prices_read)),
            cpu_per_core_hour=num("cpu_per_core_hour", "$ per core-hour"),
            memory_per_gib_hour=num("memory_per_gib_hour", "$ per GiB-hour"),
            gpu_container_cpu=num("gpu_container_cpu", "physical cores"),
            gpu_container_memory_gib=num("gpu_container_memory_gib", "GiB"),
            local_per_hour=num("local_per_hour", "$ per hour"),
            local_cpu_per_core_hour=num("local_cpu_per_core_hour", "$ per core-hour"),
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
            public_url=self.url(self.get(sec, "public_url", "api", required=False), "api.public_url", optional=True),
        )

    def read_dagster(self, raw: Any) -> DagsterConfig:
        sec = self.section(raw, "dagster", _KEYS["dagster"])
        url = self.url(self.get(sec, "webserver_url", "dagster"), "dagster.webserver_url", optional=True)
        return DagsterConfig(webserver_url=url)

    def check_name(self, name: Any, path: str, what: str) -> str:
        if not isinstance(name, str) or not NAME.match(name):
            raise self.error(path, f"{what} name {name!r} is not usable as a path segment and Dagster key.", NAME_HINT)
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
                        f"names unknown strategy {item!r} (known: {names_of(strategies)}).",
                        "Define it under strategies, or fix the name.",
                    )
                if item in names:
                    raise self.error(f"{p}.strategies[{i}]", f"lists {item!r} twice.")
                names.append(item)
            out = self.section(sec.get("output"), f"{p}.output", _KEYS["output"])
            output = OutputSpec(
                format=self.choice(self.get(out, "format", f"{p}.output", "m4a"), f"{p}.output.format", OUTPUT_FORMATS),
                bitrate=self.integer(self.get(out, "bitrate", f"{p}.output", 192), f"{p}.output.bitrate", 32, 512),
                aac_coder=self.choice(
                    self.get(out, "aac_coder", f"{p}.output", DEFAULT_AAC_CODER), f"{p}.output.aac_coder", AAC_CODERS
                ),
            )
            profiles[name] = Profile(name=name, description=description, strategies=tuple(names), output=output)
        return profiles

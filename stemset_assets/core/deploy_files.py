"""The production Dagster files, made from config.yaml so it stays the one source of the numbers:
``deploy/dagster.yaml`` (the instance of docker compose or any single host) and
``deploy/helm/values.yaml`` (Dagster's official Helm chart). ``stemset deploy render`` writes them;
a test checks the committed files equal what the shipped config.yaml renders.

What comes from config.yaml: ``runs.max_concurrent`` (the run queue's limit),
``runs.gpu_concurrency`` (the tag concurrency limit on ``stemset/gpu=true``), ``runs.max_retries``
(run retries), ``runs.start_timeout_s``, ``runs.cancel_timeout_s`` and ``runs.max_runtime_s``
(run monitoring) and ``sensors.interval_s`` (the queue's dequeue interval is kept below it).
What comes from the environment at run time: the Postgres connection (``DAGSTER_PG_*``).

Key names are Dagster 1.13's: ``dagster.yaml`` as ``dagster._core.instance.config`` defines it,
the Helm values as the chart's ``values.yaml`` / schema (``dagsterDaemon.runCoordinator``,
``dagsterDaemon.runMonitoring``, ``dagster-user-deployments.deployments[]``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import StemsetConfig
from .run_tags import GPU_TAG, GPU_TAG_VALUE

COORDINATOR_MODULE = "stemset_assets.defs.run_coordinator"
COORDINATOR_CLASS = "StemsetRunCoordinator"
STORAGE_MODULE = "stemset_assets.defs.pg_storage"  # Dagster's Postgres storage, one connection kept per store
STORAGE_CLASS = "PooledPostgresStorage"
PG_SCHEME = (
    "postgresql+psycopg2"  # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; Dagster's NOTIFY needs psycopg2
)
PG_ENV = {
    "username": "DAGSTER_PG_USERNAME",
    "password": "DAGSTER_PG_PASSWORD",
    "hostname": "DAGSTER_PG_HOST",
    "db_name": "DAGSTER_PG_DB",
    "port": "DAGSTER_PG_PORT",
}
CODE_LOCATION = "stemset"
CODE_PORT = 4000
HEADER = (
    "# Written by `stemset deploy render` from config.yaml ({what}); edit config.yaml and render again.\n"
    "# A test (tests/test_deploy_files.py) fails when this file and config.yaml disagree.\n"
)


def queue_config(config: StemsetConfig) -> dict[str, Any]:
    """The run queue: Dagster's QueuedRunCoordinator settings (snake_case, as in dagster.yaml)."""
    return {
        "max_concurrent_runs": config.runs.max_concurrent,
        "tag_concurrency_limits": [{"key": GPU_TAG, "value": GPU_TAG_VALUE, "limit": config.runs.gpu_concurrency}],
        "dequeue_interval_seconds": max(1, min(5, config.sensors.interval_s)),
    }


def monitoring_config(config: StemsetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "enabled": True,
        "start_timeout_seconds": config.runs.start_timeout_s,
        "cancel_timeout_seconds": config.runs.cancel_timeout_s,
        "poll_interval_seconds": 30,
    }
    if config.runs.max_runtime_s:
        out["max_runtime_seconds"] = config.runs.max_runtime_s
    return out


def retries_config(config: StemsetConfig) -> dict[str, Any]:
    return {
        "enabled": config.runs.max_retries > 0,
        "max_retries": config.runs.max_retries,
        "retry_on_asset_or_op_failure": True,  # a separation that failed is worth another try
    }


def instance_config(config: StemsetConfig) -> dict[str, Any]:
    """``deploy/dagster.yaml``: Postgres storage from env vars, the queue, retries, monitoring, daemons."""
    pg = {key: {"env": env} for key, env in PG_ENV.items()}
    pg["scheme"] = PG_SCHEME
    return {
        "storage": {"custom": {"module": STORAGE_MODULE, "class": STORAGE_CLASS, "config": {"postgres_db": pg}}},
        "run_coordinator": {"module": COORDINATOR_MODULE, "class": COORDINATOR_CLASS, "config": queue_config(config)},
        "run_launcher": {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"},
        "run_retries": retries_config(config),
        "run_monitoring": monitoring_config(config),
        "sensors": {"use_threads": True, "num_workers": 4},
        "backfills": {"use_threads": True, "num_workers": 4},
        "schedules": {"use_threads": True, "num_workers": 2},
        "retention": {"sensor": {"purge_after_days": {"skipped": 7, "failure": 30, "success": -1}}},
        "telemetry": {"enabled": False},
    }


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.title() for p in rest)


def helm_values(config: StemsetConfig, image: str = "ghcr.io/example/stemset", tag: str = "0.1.0") -> dict[str, Any]:
    """Values for Dagster's official chart (``helm upgrade --install dagster dagster/dagster -f``)."""
    monitoring = {_camel(k): v for k, v in monitoring_config(config).items() if k != "max_runtime_seconds"}
    monitoring["maxResumeRunAttempts"] = 0  # a separation is not resumed half-way: it is retried whole
    monitoring["freeSlotsAfterRunEndSeconds"] = 0
    secrets = [{"name": "stemset-bucket"}, {"name": "stemset-modal"}]
    code_env = [
        {"name": "STEMSET_CONFIG", "value": "/opt/stemset/config.yaml"},
        {"name": "DAGSTER_WEBSERVER_URL", "value": "http://dagster-dagster-webserver:80"},
    ]
    return {
        "global": {"postgresqlSecretName": "dagster-postgresql-secret"},
        "dagsterWebserver": {
            "image": {"repository": f"{image}-dagster", "tag": tag, "pullPolicy": "IfNotPresent"},
            "replicaCount": 1,
            "envSecrets": secrets,
        },
        "dagster-user-deployments": {
            "enabled": True,
            "deployments": [
                {
                    "name": CODE_LOCATION,
                    "image": {"repository": image, "tag": tag, "pullPolicy": "IfNotPresent"},
                    "dagsterApiGrpcArgs": ["-m", "stemset_assets.definitions"],
                    "port": CODE_PORT,
                    "env": code_env,
                    "envSecrets": secrets,
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                }
            ],
        },
        "runLauncher": {
            "type": "K8sRunLauncher",
            "config": {
                "k8sRunLauncher": {
                    "imagePullPolicy": "IfNotPresent",
                    "loadInclusterConfig": True,
                    "envSecrets": secrets,
                    "envConfigMaps": [],
                    "envVars": [],
                    "volumeMounts": [],
                    "volumes": [],
                    # A run separates on Modal (or an HTTP worker); locally it decodes and encodes.
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
                }
            },
        },
        "postgresql": {
            "enabled": False,  # a managed Postgres (RDS, Cloud SQL, ...): set the host below
            "postgresqlHost": "postgres.example.internal",
            "postgresqlUsername": "dagster",
            "postgresqlPassword": "",  # from global.postgresqlSecretName (key postgresql-password)
            "postgresqlDatabase": "dagster",
            "postgresqlScheme": PG_SCHEME,
            "postgresqlParams": {},
            "service": {"port": 5432},
        },
        "generatePostgresqlPasswordSecret": False,
        "dagsterDaemon": {
            "enabled": True,
            "image": {"repository": f"{image}-dagster", "tag": tag, "pullPolicy": "IfNotPresent"},
            "envSecrets": secrets,
            "runCoordinator": {
                "enabled": True,
                "type": "CustomRunCoordinator",
                "config": {
                    "customRunCoordinator": {
                        "module": COORDINATOR_MODULE,
                        "class": COORDINATOR_CLASS,
                        "config": queue_config(config),
                    }
                },
            },
            "runMonitoring": monitoring,
            "runRetries": {"enabled": config.runs.max_retries > 0, "maxRetries": config.runs.max_retries},
            "sensors": {"useThreads": True, "numWorkers": 4},
            "schedules": {"useThreads": True, "numWorkers": 2},
        },
        "telemetry": {"enabled": False},
        # No run_monitoring here: the chart writes that key from dagsterDaemon.runMonitoring, which has
        # no max runtime; a second run_monitoring key would replace it. On Kubernetes a run whose pod
        # died is failed by the health check; a per-run cap is the tag dagster/max_runtime.
        "additionalInstanceConfig": {"backfills": {"use_threads": True, "num_workers": 4}},
    }


def rendered_text(config: StemsetConfig) -> dict[str, str]:
    """``{path relative to deploy/: text}`` of the files :func:`render` writes."""
    files = {
        "dagster.yaml": (instance_config(config), "the Dagster instance: compose and single hosts"),
        "helm/values.yaml": (helm_values(config), "values for Dagster's Helm chart"),
    }
    return {
        rel: HEADER.format(what=what) + yaml.safe_dump(data, sort_keys=False, width=120)
        for rel, (data, what) in files.items()
    }


def render(config: StemsetConfig, out_dir: Path) -> list[Path]:
    """Write ``dagster.yaml`` and ``helm/values.yaml`` under ``out_dir``; returns the paths."""
    paths = []
    for rel, text in rendered_text(config).items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths

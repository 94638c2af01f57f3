"""deploy/: what can be checked without Docker or Kubernetes.

- ``deploy/dagster.yaml`` and ``deploy/helm/values.yaml`` are what ``stemset deploy render`` makes
  of the shipped config.yaml (config.yaml is the one source of the numbers);
- dagster.yaml passes Dagster 1.13's own instance schema (and the run queue's);
- the Helm values use only keys of Dagster's chart (key names from the chart's schema,
  ``helm/dagster/schema`` in dagster-io/dagster at 1.13, listed below), and the coordinator config
  passes the QueuedRunCoordinator's schema;
- docker-compose.yml has the services and wiring the deployment needs;
- each Dockerfile's ``pip install`` of packages runs as ``pip install --dry-run`` against this
  project (needs the package index, or the packages already installed).

Docker and Helm themselves are not run here (no daemon, no cluster): see the README.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster._config import Shape, validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator

from stemset_assets.cli.main import main
from stemset_assets.config import load_config
from stemset_assets.core.deploy_files import PG_ENV, rendered_text
from stemset_assets.core.run_tags import GPU_TAG
from stemset_assets.defs.pg_storage import PooledPostgresStorage

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# Key names of Dagster's Helm chart (1.13), from its pydantic schema (helm/dagster/schema/schema/charts).
CHART_TOP = {
    "dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
    "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
    "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
    "telemetry", "serviceAccount", "global", "retention", "additionalInstanceConfig",
}  # fmt: skip
CHART_GLOBAL = {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"}
CHART_WEBSERVER = {
    "replicaCount", "image", "nameOverride", "pathPrefix", "service", "workspace", "env", "envConfigMaps",
    "envSecrets", "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
    "securityContext", "resources", "readinessProbe", "livenessProbe", "startupProbe", "annotations",
    "enableReadOnly", "dbStatementTimeout", "dbPoolRecycle", "logLevel", "schedulerName", "volumeMounts", "volumes",
}  # fmt: skip
CHART_USER_DEPLOYMENTS = {"enabled", "enableSubchart", "imagePullSecrets", "deployments"}
CHART_USER_DEPLOYMENT = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "port", "env",
    "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
    "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels", "volumeMounts",
    "volumes", "schedulerName",
}  # fmt: skip
CHART_K8S_RUN_LAUNCHER = {
    "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
    "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
    "schedulerName", "securityContext", "runK8sConfig",
}  # fmt: skip
CHART_POSTGRESQL = {
    "image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword", "postgresqlDatabase",
    "postgresqlParams", "postgresqlScheme", "service",
}  # fmt: skip
CHART_DAEMON = {
    "enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps", "envSecrets",
    "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
    "resources", "livenessProbe", "readinessProbe", "startupProbe", "annotations", "runMonitoring", "runRetries",
    "sensors", "schedules", "schedulerName", "volumeMounts", "volumes",
}  # fmt: skip
# configmap-instance.yaml reads these under dagsterDaemon.runMonitoring / runRetries
CHART_RUN_MONITORING = {
    "enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts", "pollIntervalSeconds",
    "freeSlotsAfterRunEndSeconds",
}  # fmt: skip
CHART_RUN_RETRIES = {"enabled", "maxRetries"}


def shipped_config():
    return load_config(ROOT / "config.yaml", env={})


def test_committed_files_are_what_config_yaml_renders(tmp_path):
    for rel, text in rendered_text(shipped_config()).items():
        assert (DEPLOY / rel).read_text() == text, f"deploy/{rel} is stale: run `stemset deploy render`"
    assert main(["-c", str(ROOT / "config.yaml"), "deploy", "render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "dagster.yaml").read_text() == (DEPLOY / "dagster.yaml").read_text()
    assert main(["-c", str(ROOT / "config.yaml"), "deploy", "render", "--check", "--out", str(DEPLOY)]) == 0
    (tmp_path / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    assert main(["-c", str(ROOT / "config.yaml"), "deploy", "render", "--check", "--out", str(tmp_path)]) == 1


def test_dagster_yaml_passes_dagsters_instance_schema():
    data = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    result = validate_config(Shape(dagster_instance_config_schema()), data)
    assert result.success, result.errors
    coordinator = data["run_coordinator"]
    assert (coordinator["module"], coordinator["class"]) == (
        "stemset_assets.defs.run_coordinator",
        "StemsetRunCoordinator",
    )
    assert validate_config(QueuedRunCoordinator.config_type(), coordinator["config"]).success
    config = shipped_config()
    (limit,) = coordinator["config"]["tag_concurrency_limits"]
    assert limit == {"key": GPU_TAG, "value": "true", "limit": config.runs.gpu_concurrency}
    assert coordinator["config"]["max_concurrent_runs"] == config.runs.max_concurrent
    assert data["run_retries"]["max_retries"] == config.runs.max_retries
    assert data["run_monitoring"]["start_timeout_seconds"] == config.runs.start_timeout_s
    assert data["run_monitoring"]["cancel_timeout_seconds"] == config.runs.cancel_timeout_s
    storage = data["storage"]["custom"]
    assert (storage["module"], storage["class"]) == ("stemset_assets.defs.pg_storage", "PooledPostgresStorage")
    assert validate_config(PooledPostgresStorage.config_type(), storage["config"]).success  # Dagster's own keys
    pg = storage["config"]["postgres_db"]
    assert pg["scheme"] == "postgresql+psycopg2"  # not psycopg 3: Dagster's LISTEN/NOTIFY needs psycopg2
    assert {k: v["env"] for k, v in pg.items() if k != "scheme"} == PG_ENV
    # Unknown keys are refused by the same schema (the check is not vacuous).
    assert not validate_config(Shape(dagster_instance_config_schema()), {**data, "run_monitor": {}}).success


def test_helm_values_use_only_the_charts_keys():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert set(values) <= CHART_TOP, set(values) - CHART_TOP
    assert set(values["global"]) <= CHART_GLOBAL
    assert set(values["dagsterWebserver"]) <= CHART_WEBSERVER
    users = values["dagster-user-deployments"]
    assert set(users) <= CHART_USER_DEPLOYMENTS and users["enabled"] is True
    (code,) = users["deployments"]
    assert set(code) <= CHART_USER_DEPLOYMENT
    assert code["dagsterApiGrpcArgs"] == ["-m", "stemset_assets.definitions"]
    assert {s["name"] for s in code["envSecrets"]} == {"stemset-bucket", "stemset-modal"}
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher" and set(launcher["config"]["k8sRunLauncher"]) <= CHART_K8S_RUN_LAUNCHER
    assert set(values["postgresql"]) <= CHART_POSTGRESQL
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    daemon = values["dagsterDaemon"]
    assert set(daemon) <= CHART_DAEMON
    assert set(daemon["runMonitoring"]) <= CHART_RUN_MONITORING and set(daemon["runRetries"]) <= CHART_RUN_RETRIES
    coordinator = daemon["runCoordinator"]
    assert coordinator["type"] == "CustomRunCoordinator"
    custom = coordinator["config"]["customRunCoordinator"]
    assert set(custom) == {"module", "class", "config"}
    assert validate_config(QueuedRunCoordinator.config_type(), custom["config"]).success
    extra = values["additionalInstanceConfig"]
    assert validate_config(Shape(dagster_instance_config_schema()), extra).success
    secrets = list(yaml.safe_load_all((DEPLOY / "helm" / "secrets.example.yaml").read_text()))
    assert {s["metadata"]["name"] for s in secrets} == {
        values["global"]["postgresqlSecretName"],
        *(s["name"] for s in code["envSecrets"]),
    }


def test_compose_wires_postgres_code_location_webserver_daemon_and_optional_s3():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "code", "webserver", "daemon", "s3"}
    assert services["s3"]["profiles"] == ["s3"]  # optional
    assert "profiles" not in services["code"]
    code_cmd = yaml.safe_load((DEPLOY / "Dockerfile.code").read_text().split("CMD ", 1)[1].replace("\\\n", ""))
    assert code_cmd[:3] == ["dagster", "code-server", "start"] and "stemset_assets.definitions" in code_cmd
    port = int(code_cmd[code_cmd.index("-p") + 1])
    (server,) = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())["load_from"]
    assert server["grpc_server"] == {"host": "code", "port": port, "location_name": "stemset"}
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    for name in ("code", "webserver", "daemon"):
        svc = services[name]
        assert set(PG_ENV.values()) <= set(svc["environment"]), name
        assert "./dagster.yaml:/opt/dagster/home/dagster.yaml:ro" in svc["volumes"], name
        assert svc["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["code"]["env_file"] == ".env"  # bucket and Modal secrets: only the code location needs them
    for name in ("webserver", "daemon"):
        assert "env_file" not in services[name]
    env_names = {line.split("=")[0] for line in (DEPLOY / "env.example").read_text().splitlines() if "=" in line}
    assert {"DAGSTER_PG_PASSWORD", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "MODAL_TOKEN_ID"} <= env_names
    assert "deploy/.env" in (ROOT / ".gitignore").read_text()


def dockerfile_installs(path: Path) -> list[list[str]]:
    """The argument lists of the Dockerfile's ``pip install`` steps (line continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if line.startswith("RUN ") and "pip install" in line:
            for part in line[4:].split("&&"):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    steps.append(words[2:])
    return steps


def test_dockerfiles_copy_what_exists():
    for name in ("Dockerfile.code", "Dockerfile.dagster"):
        for line in (DEPLOY / name).read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}"


@pytest.mark.parametrize("name", ["Dockerfile.code", "Dockerfile.dagster"])
def test_dockerfile_pip_install_resolves_against_the_project(name):
    """Each ``pip install`` of the image (but the PyTorch wheel from PyTorch's own index, which
    ``scripts/setup.sh`` installs the same way) resolves with ``pip install --dry-run``, with
    ``.`` / ``/opt/stemset`` meaning this checkout."""
    steps = [s for s in dockerfile_installs(DEPLOY / name) if "--index-url" not in s]
    assert steps
    for args in steps:
        args = [a for a in args if a != "--no-cache-dir"]
        args = [re.sub(r"^(\.|/opt/stemset)(\[|$)", lambda m: str(ROOT) + m.group(2), a) for a in args]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{name}: pip install {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"

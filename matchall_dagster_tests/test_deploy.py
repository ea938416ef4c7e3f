"""The Kubernetes deployment (deploy/helm/values.yaml, Dockerfile, deploy/build_image.sh): what can
be checked without a cluster, Docker or helm.

The values are read as the chart reads them, and the instance file the chart writes from them
(its configmap-instance.yaml, for the sections this project sets) goes through Dagster's own
validation. The code server starts exactly as the chart starts it, with the chart's environment.
The image's build steps, and the K8sRunLauncher's own config validation (dagster-k8s is installed
in the image, not in the dev environment), run under `-m slow`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml
from dagster._config import process_config  # what rehydrating an instance's classes runs
from dagster._core.instance.config import dagster_instance_config  # what loading DAGSTER_HOME runs
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from matchall_dagster.api.budget import BudgetStore
from matchall_dagster.definitions import defs as project_defs
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.simulator import DEFAULT_TOKEN
from matchall_dagster.storage.store import StoreUrl

REPO = Path(__file__).resolve().parents[1]
VALUES = REPO / "deploy" / "helm" / "values.yaml"
DEPLOY_INSTANCE = REPO / "deploy" / "dagster.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_SCRIPT = REPO / "deploy" / "build_image.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

MODULE = "matchall_dagster.definitions"
ACCOUNT_REQUESTS_PER_SECOND = 5  # ActiveCampaign: 5 requests/s per account (API.md)
# What docs/production.md's `kubectl create secret` commands put in each secret the values name.
SECRET_KEYS = {"activecampaign-api": {"ACTIVECAMPAIGN_API_KEY"}, "matchall-postgresql": {"PGPASSWORD"}}
PG_SECRET = "matchall-postgresql"  # PGPASSWORD, for the membership store and the request budget
STORE_SCHEMA = "matchall"
PG_PASSWORD_KEY = "postgresql-password"  # the key the chart reads from global.postgresqlSecretName
# The chart's own defaults for what the rendering below needs and the values leave alone
# (helm/dagster/values.yaml and _helpers.tpl); the release as the README installs it.
RELEASE, NAMESPACE = "dagster", "dagster"
CHART_DEFAULTS = {"dagsterHome": "/opt/dagster/dagster_home", "k8sImagePullPolicy": "Always"}
DEPLOY_FILES = (VALUES, DOCKERFILE, DOCKERIGNORE, BUILD_SCRIPT)
SECRET_WORDS = ("password", "token", "apikey", "api_key", "secretkey")
ENV_SECRET_WORDS = ("key", "password", "token", "secret")


# A kubeconfig that K8sRunLauncher can load outside a cluster; nothing connects to it.
LOOPBACK_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
    "users": [{"name": "none", "user": {}}],
    "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    "current-context": "none",
}
# Run in the image's Python: the run pod's Job as K8sRunLauncher builds it (its launch path:
# K8sContainerContext.create_for_run, then construct_dagster_k8s_job), printed as JSON.
RUN_POD_JOB = r"""
import json, sys
import kubernetes
from dagster._config import process_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

given = json.load(sys.stdin)
result = process_config(K8sRunLauncher.config_type(), given["launcher"])
assert result.success, [error.message for error in result.errors]
config = {**result.value, "load_incluster_config": False, "kubeconfig_file": given["kubeconfig"]}
launcher = K8sRunLauncher(**config)
context = K8sContainerContext(
    image_pull_policy=launcher.image_pull_policy,
    service_account_name=launcher.service_account_name,
    env_config_maps=launcher.env_config_maps,
    env_secrets=launcher.env_secrets,
    env_vars=launcher.env_vars,
    volume_mounts=launcher.volume_mounts,
    volumes=launcher.volumes,
    namespace=launcher.job_namespace,
    run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher.run_k8s_config or {}),
).merge(K8sContainerContext.create_from_config(given["context"]))
job = construct_dagster_k8s_job(
    job_config=context.get_k8s_job_config(job_image=given["image"], run_launcher=launcher),
    args=["dagster", "api", "execute_run", "{}"],
    job_name="dagster-run-check",
    pod_name="dagster-run-check",
    component="run_worker",
    user_defined_k8s_config=context.run_k8s_config,
)
print(json.dumps(job.to_dict(), default=str))
"""


def load_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(VALUES.read_text())
    return values


def deployment(values: Mapping[str, Any]) -> dict[str, Any]:
    """The project's (only) user code deployment."""
    deployments = values["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1
    only: dict[str, Any] = deployments[0]
    return only


def k8s_launcher(values: Mapping[str, Any]) -> dict[str, Any]:
    launcher: dict[str, Any] = values["runLauncher"]["config"]["k8sRunLauncher"]
    return launcher


def grpc_module(args: list[str]) -> str:
    """The module a `dagster api grpc` argument list loads."""
    for flag in ("--module-name", "-m"):
        if flag in args:
            return args[args.index(flag) + 1]
    raise AssertionError(f"no --module-name in {args}")


def env_var_names(resource: dg.ConfigurableResource[Any]) -> set[str]:
    """The environment variables a resource reads through EnvVar."""
    return {
        value.env_var_name
        for name in type(resource).model_fields
        if isinstance(value := getattr(resource, name), dg.EnvVar)
    }


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def dockerfile_instruction(keyword: str) -> list[str]:
    return re.findall(rf"^{keyword} (.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)


def pyproject_pin(package: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        if name == package:
            return str(version).split()[0]
    raise AssertionError(f"pyproject.toml pins no {package}")


# -- what the chart makes of the values ---------------------------------------------------------


def chart_instance_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The dagster.yaml the chart writes (configmap-instance.yaml and helpers/instance/*.tpl),
    for the sections this project sets; raises on a setting this rendering does not know, so that
    nothing set in the values goes unchecked."""
    pg = values["postgresql"]
    postgres_db: dict[str, Any] = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams", {}),
    }
    if pg.get("postgresqlScheme"):
        postgres_db["scheme"] = pg["postgresqlScheme"]
    storage = {"postgres_db": postgres_db}

    launcher = k8s_launcher(values)
    known = {"envSecrets", "volumes", "volumeMounts", "runK8sConfig"}
    assert set(launcher) <= known, f"not rendered here: {set(launcher) - known}"
    run_k8s_config = {
        re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): value for key, value in launcher.get("runK8sConfig", {}).items()
    }
    config: dict[str, Any] = {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": storage,
        },
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": storage},
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": storage,
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": values["runLauncher"]["type"],
            "config": {
                "load_incluster_config": True,
                "job_namespace": NAMESPACE,
                "image_pull_policy": CHART_DEFAULTS["k8sImagePullPolicy"],
                "service_account_name": RELEASE,
                "dagster_home": CHART_DEFAULTS["dagsterHome"],
                "instance_config_map": f"{RELEASE}-instance",
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "env_secrets": [secret["name"] for secret in launcher.get("envSecrets", [])],
                "volume_mounts": launcher.get("volumeMounts", []),
                "volumes": launcher.get("volumes", []),
                "run_k8s_config": run_k8s_config,
            },
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    if coordinator["enabled"]:
        assert coordinator["type"] == "QueuedRunCoordinator"
        queued = coordinator.get("config", {}).get("queuedRunCoordinator") or {}
        names = {"maxConcurrentRuns": "max_concurrent_runs", "tagConcurrencyLimits": "tag_concurrency_limits"}
        assert set(queued) <= set(names), f"not rendered here: {set(queued) - set(names)}"
        config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
        if any(value is not None for value in queued.values()):
            config["run_coordinator"]["config"] = {names[key]: value for key, value in queued.items()}
    if daemon.get("sensors", {}).get("useThreads", True):  # the chart's default is threads
        config["sensors"] = {"use_threads": True}
    concurrency = values.get("concurrency", {})
    if concurrency.get("enabled"):
        pools, runs = concurrency.get("pools", {}), concurrency.get("runs", {})
        config["concurrency"] = {}
        if pools.get("defaultLimit") is not None:
            config["concurrency"]["pools"] = {"default_limit": pools["defaultLimit"]}
        if runs.get("maxConcurrentRuns") is not None:
            config["concurrency"]["runs"] = {"max_concurrent_runs": runs["maxConcurrentRuns"]}
    return config


def chart_container_context(values: Mapping[str, Any]) -> dict[str, Any]:
    """DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT as the user deployments subchart builds it
    (k8sContainerContext in its _helpers.tpl): what every run pod of the location inherits."""
    code = deployment(values)
    k8s: dict[str, Any] = {
        "image_pull_policy": code["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-dagster-user-deployments-{code['name']}-user-env"],
        "namespace": NAMESPACE,
        "service_account_name": f"{RELEASE}-dagster-user-deployments-user-deployments",
    }
    if code.get("envSecrets"):
        k8s["env_secrets"] = [secret["name"] for secret in code["envSecrets"]]
    if isinstance(code.get("env"), list):
        k8s["env"] = code["env"]
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("resources", "resources")):
        if code.get(key):
            k8s[name] = code[key]
    return {"k8s": k8s}


def chart_code_server_env(values: Mapping[str, Any], home: Path) -> dict[str, str]:
    """The code server's environment on the cluster (deployment-user.yaml), secrets random. The
    API URL and the PostgreSQL URLs (store, budget) point at a closed loopback port: loading the
    code sends no request and opens no connection, and a test never reaches out of this machine."""
    code = deployment(values)
    image = code["image"]
    env = {
        "PATH": os.environ["PATH"],
        "DAGSTER_HOME": str(home),
        "DAGSTER_K8S_PIPELINE_RUN_NAMESPACE": NAMESPACE,
        "DAGSTER_CURRENT_IMAGE": f"{image['repository']}:{image['tag']}",
        "DAGSTER_PG_PASSWORD": secrets.token_hex(16),
        "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT": json.dumps(chart_container_context(values)),
    }
    env.update({variable["name"]: variable["value"] for variable in code.get("env", [])})
    for secret in code.get("envSecrets", []):
        env.update({key: secrets.token_hex(16) for key in SECRET_KEYS[secret["name"]]})
    env["ACTIVECAMPAIGN_API_URL"] = "http://127.0.0.1:9"
    for name in ("MATCHALL_STORE", "MATCHALL_REQUEST_BUDGET"):  # the same URLs, on a closed loopback port
        env[name] = urlsplit(env[name])._replace(netloc=f"{urlsplit(env[name]).username}@127.0.0.1:9").geturl()
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def chart_code_server(bin_dir: Path, values: Mapping[str, Any], home: Path, log: Path) -> Iterator[dict[str, str]]:
    """`dagster api grpc -h ... -p <port> <dagsterApiGrpcArgs>` as the chart runs it, on 127.0.0.1,
    with the chart's environment; yields that environment once the chart's readiness probe
    (`dagster api grpc-health-check`) passes. Stopped by process group at the end."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = chart_code_server_env(values, home)
    command = [str(bin_dir / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(port)]
    command += deployment(values)["dagsterApiGrpcArgs"]
    workdir = home.parent / "workdir"  # the image's empty WORKDIR
    workdir.mkdir(exist_ok=True)
    with log.open("wb") as output:
        server = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"the code server exited ({server.returncode}):\n{log.read_text()}"
            probe = subprocess.run(
                [str(bin_dir / "dagster"), "api", "grpc-health-check", "-h", "127.0.0.1", "-p", str(port)],
                env=env,
                cwd=workdir,
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no SERVING within 90 s: {probe.stdout}\n{log.read_text()}"
            time.sleep(0.5)
        yield env
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def validated_instance(config: Mapping[str, Any], home: Path) -> dict[str, Any]:
    """The instance file as Dagster validates it when DAGSTER_HOME holds it."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(dict(config)))
    validated, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    return dict(validated)


# -- the values ---------------------------------------------------------------------------------


def test_user_code_deployment_serves_the_projects_definitions_from_its_image() -> None:
    values = load_values()
    code = deployment(values)
    assert code["name"] == "matchall-dagster"
    assert code["image"]["repository"].endswith("/matchall-dagster")
    assert code["image"]["tag"] == PYPROJECT["project"]["version"]  # a str: the chart quotes nothing
    assert grpc_module(code["dagsterApiGrpcArgs"]) == MODULE
    (exposed,) = dockerfile_instruction("EXPOSE")
    assert code["port"] == int(exposed)
    assert values["dagster-user-deployments"]["enabled"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_every_variable_the_definitions_read_comes_from_the_values_or_a_secret() -> None:
    values = load_values()
    code = deployment(values)
    needed = set()
    for resource in (project_defs().resources or {}).values():
        if isinstance(resource, dg.ConfigurableResource):
            needed |= env_var_names(resource)
    assert needed >= {"ACTIVECAMPAIGN_API_URL", "ACTIVECAMPAIGN_API_KEY"}
    plain = {variable["name"] for variable in code["env"]}
    from_secrets = set().union(*(SECRET_KEYS[secret["name"]] for secret in code["envSecrets"]))
    assert needed <= plain | from_secrets, f"not provided on the cluster: {needed - plain - from_secrets}"
    assert "ACTIVECAMPAIGN_API_KEY" in from_secrets
    assert "ACTIVECAMPAIGN_API_KEY" not in plain
    assert all("valueFrom" not in variable for variable in code["env"])  # plain values only, nothing hidden


def test_api_key_secret_reaches_the_code_server_and_every_run_pod() -> None:
    values = load_values()
    code = deployment(values)
    names = {secret["name"] for secret in code["envSecrets"]}
    assert names == set(SECRET_KEYS)
    # Sensors run in the code server; runs in pods of their own, which get the secret both from the
    # run launcher and from the code location's container context.
    assert {secret["name"] for secret in k8s_launcher(values)["envSecrets"]} >= names
    assert code["includeConfigInLaunchedRuns"]["enabled"] is True
    assert set(chart_container_context(values)["k8s"]["env_secrets"]) >= names


def test_postgresql_password_comes_from_the_charts_secret() -> None:
    values = load_values()
    pg = values["postgresql"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert "postgresqlPassword" not in pg
    assert pg["enabled"] is False
    assert pg["postgresqlHost"]
    assert pg["postgresqlUsername"]
    assert pg["postgresqlDatabase"]
    assert pg["service"]["port"] == 5432
    # Dagster's documented configuration, as deploy/dagster.yaml has it: no driver named (SQLAlchemy < 2.1).
    production = yaml.safe_load(DEPLOY_INSTANCE.read_text())["storage"]["postgres"]["postgres_db"]
    assert "scheme" not in production
    assert not pg.get("postgresqlScheme")


def test_queue_pools_sensors_and_telemetry_match_the_production_instance(tmp_path: Path) -> None:
    values = load_values()
    production = validated_instance(yaml.safe_load(DEPLOY_INSTANCE.read_text()), tmp_path / "production")
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True
    assert coordinator["type"] == "QueuedRunCoordinator"
    # The run limit in one place: the chart fails when it is in both.
    assert (coordinator.get("config", {}).get("queuedRunCoordinator") or {}).get("maxConcurrentRuns") is None
    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True
    assert concurrency["pools"]["defaultLimit"] == production["concurrency"]["pools"]["default_limit"] == 2
    assert concurrency["runs"]["maxConcurrentRuns"] == production["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["dagsterDaemon"]["sensors"]["useThreads"] is production["sensors"]["use_threads"] is False
    assert values["telemetry"]["enabled"] is production["telemetry"]["enabled"] is False


def test_every_pod_takes_from_one_budget_in_the_instances_postgresql() -> None:
    """Pools are instance-wide, but the rate is the budget's: the code server (sensors) and, through
    includeConfigInLaunchedRuns, every run pod name the same PostgreSQL store, on the instance's
    server, with the password from the chart's secret (never a literal)."""
    values = load_values()
    env = {v["name"]: v for v in deployment(values)["env"]}
    store = BudgetStore.parse(env["MATCHALL_REQUEST_BUDGET"]["value"])
    assert store.kind == "postgresql"
    url = urlsplit(store.location)
    postgres = values["postgresql"]
    assert (url.hostname, url.username, url.path.lstrip("/")) == (
        postgres["postgresqlHost"],
        postgres["postgresqlUsername"],
        postgres["postgresqlDatabase"],
    )
    assert url.password is None  # PGPASSWORD, from the secret matchall-postgresql
    assert "PGPASSWORD" not in env
    assert {"name": PG_SECRET} in deployment(values)["envSecrets"]
    assert {"name": PG_SECRET} in k8s_launcher(values)["envSecrets"]
    resource = (project_defs().resources or {})["activecampaign"]
    assert isinstance(resource, ActiveCampaignResource)
    assert resource.requests_per_second == ACCOUNT_REQUESTS_PER_SECOND


def test_every_pod_stores_memberships_in_the_instances_postgresql() -> None:
    """The code server (the sensors read the catalog) and, through includeConfigInLaunchedRuns, every
    run pod name one PostgreSQL store: the instance's server, user and database, a schema of its own,
    no password in the URL; PGPASSWORD comes from a Kubernetes secret, never a literal."""
    values = load_values()
    code = deployment(values)
    env = {v["name"]: v for v in code["env"]}
    assert "MATCHALL_DUCKDB_PATH" not in env  # refused by the settings now: MATCHALL_STORE replaces it
    store = StoreUrl.parse(env["MATCHALL_STORE"]["value"])
    assert (store.kind, store.schema) == ("postgresql", STORE_SCHEMA)
    url = urlsplit(env["MATCHALL_STORE"]["value"])
    postgres = values["postgresql"]
    assert (url.hostname, url.port, url.username, url.path.lstrip("/"), url.query) == (
        postgres["postgresqlHost"],
        postgres["service"]["port"],
        postgres["postgresqlUsername"],
        postgres["postgresqlDatabase"],
        f"schema={STORE_SCHEMA}",
    )
    assert url.password is None
    # The same server, user and database as the budget's: one password, one secret.
    budget = urlsplit(env["MATCHALL_REQUEST_BUDGET"]["value"])
    assert (budget.hostname, budget.port, budget.username, budget.path) == (
        url.hostname,
        url.port,
        url.username,
        url.path,
    )
    assert "PGPASSWORD" not in env
    assert SECRET_KEYS[PG_SECRET] == {"PGPASSWORD"}
    assert {"name": PG_SECRET} in code["envSecrets"]
    assert {"name": PG_SECRET} in k8s_launcher(values)["envSecrets"]
    # What every run pod inherits: the location's env (MATCHALL_STORE) and its secrets.
    assert code["includeConfigInLaunchedRuns"]["enabled"] is True
    context = chart_container_context(values)["k8s"]
    assert env["MATCHALL_STORE"] in context["env"]
    assert PG_SECRET in context["env_secrets"]


def test_no_volume_is_left_for_a_duckdb_file() -> None:
    """PostgreSQL holds the memberships: no ReadWriteMany claim, no mount, no fsGroup for it."""
    values = load_values()
    launcher, code = k8s_launcher(values), deployment(values)
    for part in (launcher, code):
        assert not {"volumes", "volumeMounts"} & part.keys()
    rendered = chart_instance_config(values)["run_launcher"]["config"]
    assert rendered["volumes"] == rendered["volume_mounts"] == []
    # The run pods still run as the image's user (Dockerfile USER), not as root.
    (user,) = dockerfile_instruction("USER")
    uid, _, gid = user.partition(":")
    security = launcher["runK8sConfig"]["podSpecConfig"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert security["runAsNonRoot"] is True
    assert "fsGroup" not in security
    assert "/var/lib/matchall" not in DOCKERFILE.read_text()


def test_charts_instance_file_passes_dagsters_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", secrets.token_hex(16))  # {env: ...} is resolved
    config = validated_instance(chart_instance_config(load_values()), tmp_path / "home")
    assert config["run_launcher"] == {**config["run_launcher"], "module": "dagster_k8s", "class": "K8sRunLauncher"}
    # Dagster's documented storage: no `scheme` (the driver is psycopg2's default under SQLAlchemy < 2.1).
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        assert "scheme" not in config[key]["config"]["postgres_db"]
    assert config["concurrency"] == {"pools": {"default_limit": 2}, "runs": {"max_concurrent_runs": 4}}
    assert "sensors" not in config  # the default: one evaluation at a time
    assert config["telemetry"] == {"enabled": False}
    # The classes' own config, as rehydrating the instance checks it (dagster-k8s: -m slow).
    for storage_class, key in (
        (PostgresRunStorage, "run_storage"),
        (PostgresEventLogStorage, "event_log_storage"),
        (PostgresScheduleStorage, "schedule_storage"),
    ):
        result = process_config(storage_class.config_type(), config[key]["config"])
        assert result.success, [error.message for error in result.errors or []]
    result = process_config(QueuedRunCoordinator.config_type(), config["run_coordinator"].get("config", {}))
    assert result.success, [error.message for error in result.errors or []]


def test_the_instance_validation_refuses_the_run_limit_in_two_places(tmp_path: Path) -> None:
    """Dagster's validation above is live: the run limit in the coordinator as well fails it."""
    values = load_values()
    values["dagsterDaemon"]["runCoordinator"]["config"] = {"queuedRunCoordinator": {"maxConcurrentRuns": 4}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurrent_runs"):
        validated_instance(chart_instance_config(values), tmp_path / "home")


def _secret_like_literals(node: Any, path: str = "") -> Iterator[str]:
    """Paths of string values under keys that name a secret, and env entries that set one inline.
    A reference to a secret (`...SecretName`, `envSecrets`) is fine; a bool such as
    generatePostgresqlPasswordSecret is not a value."""
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and "value" in node and any(word in name.lower() for word in ENV_SECRET_WORDS):
            yield f"{path}.{name}"
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            lowered = str(key).lower()
            if (
                isinstance(value, str)
                and any(word in lowered for word in SECRET_WORDS)
                and not lowered.endswith("name")
            ):
                yield here
            yield from _secret_like_literals(value, here)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _secret_like_literals(item, f"{path}[{index}]")


def test_no_secret_is_written_in_the_deploy_files() -> None:
    assert list(_secret_like_literals(load_values())) == []
    for path in DEPLOY_FILES:
        text = path.read_text()
        assert DEFAULT_TOKEN not in text, path
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{path}: no user:password@host in a URL"
    for line in dockerfile_instruction("ENV") + dockerfile_instruction("ARG"):
        assert not re.search(r"KEY|PASSWORD|TOKEN|SECRET", line), f"Dockerfile bakes a secret in: {line}"


def test_secret_scan_finds_literals() -> None:
    values = load_values()
    values["postgresql"]["postgresqlPassword"] = "hunter2"
    env = deployment(values)["env"]
    env.append({"name": "ACTIVECAMPAIGN_API_KEY", "value": "abc"})
    assert sorted(_secret_like_literals(values)) == [
        f"dagster-user-deployments.deployments[0].env[{len(env) - 1}].ACTIVECAMPAIGN_API_KEY",
        "postgresql.postgresqlPassword",
    ]


# -- the image ----------------------------------------------------------------------------------


def test_dockerfile_pins_match_the_project() -> None:
    args = dockerfile_args()
    minimum = re.match(r">=\s*(\d+\.\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum is not None
    assert args["PYTHON_VERSION"] == minimum.group(1)
    assert all(line.startswith("python:${PYTHON_VERSION}-") for line in dockerfile_instruction("FROM"))
    # dagster-k8s is an integration library: the release of dagster-postgres, matching dagster's pin.
    assert args["DAGSTER_K8S_VERSION"] == pyproject_pin("dagster-postgres")
    install = next(line for line in DOCKERFILE.read_text().splitlines() if "pip install" in line)
    assert re.search(r"/matchall_dagster-\*\.whl\s", install), "the wheel, without extras"
    assert " -e " not in install
    assert "[dev" not in DOCKERFILE.read_text()
    assert "pip wheel --no-deps" in DOCKERFILE.read_text()


def test_dockerfile_runs_the_code_server_as_a_non_root_user() -> None:
    (user,) = dockerfile_instruction("USER")
    uid = int(user.partition(":")[0])
    assert uid != 0
    code = deployment(load_values())
    assert code["podSecurityContext"]["runAsUser"] == uid
    assert code["podSecurityContext"]["runAsNonRoot"] is True
    (cmd,) = dockerfile_instruction("CMD")
    assert json.loads(cmd) == ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", MODULE]
    assert grpc_module(json.loads(cmd)) == grpc_module(code["dagsterApiGrpcArgs"])


def test_build_context_is_only_what_the_dockerfile_copies() -> None:
    copied = set()
    for line in dockerfile_instruction("COPY"):
        if "--from=" not in line:
            copied.update(shlex.split(line)[:-1])
    assert copied == {"pyproject.toml", PYPROJECT["project"]["readme"], "matchall_dagster"}
    rules = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == copied


def test_build_script_takes_its_versions_from_the_dockerfile() -> None:
    script = "\n".join(line for line in BUILD_SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert os.access(BUILD_SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=True)
    for name, value in dockerfile_args().items():
        assert f"dockerfile_arg {name}" in script
        assert value not in script, f"the script repeats the Dockerfile's {name}={value}"
    assert f'MODULE="{MODULE}"' in script


# -- the code server, as the chart starts it ------------------------------------------------------


def test_code_server_loads_with_the_charts_arguments_and_environment(tmp_path: Path) -> None:
    """The dev environment's `dagster` here; the image's own under -m slow."""
    with chart_code_server(Path(sys.executable).parent, load_values(), tmp_path / "home", tmp_path / "grpc.log") as env:
        pass
    log = (tmp_path / "grpc.log").read_text()
    assert f"Started Dagster code server for module {MODULE}" in log
    assert env["ACTIVECAMPAIGN_API_KEY"] not in log
    assert env["PGPASSWORD"] not in log


def test_code_server_fails_fast_without_the_module(tmp_path: Path) -> None:
    """The health check above means the code loaded: a server that cannot load it exits."""
    values = load_values()
    deployment(values)["dagsterApiGrpcArgs"] = ["--module-name", "matchall_dagster.no_such_module"]
    with (
        pytest.raises(AssertionError, match="the code server exited"),
        chart_code_server(Path(sys.executable).parent, values, tmp_path / "home", tmp_path / "grpc.log"),
    ):
        pass


# -- the image's build steps (a few minutes: a fresh virtualenv from PyPI) -------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_build_steps_serve_the_code_location(tmp_path: Path) -> None:
    prefix = tmp_path / "image"
    subprocess.run([str(BUILD_SCRIPT), "--keep", str(prefix)], check=True, timeout=840)
    bin_dir = prefix / "venv" / "bin"
    values = load_values()
    # The image's dagster-k8s takes what the chart hands it: the run launcher's config from the
    # instance file (its config schema), the location's container context, and builds the Job of a
    # run pod exactly as K8sRunLauncher does.
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(LOOPBACK_KUBECONFIG))
    image = deployment(values)["image"]
    checked = subprocess.run(
        [str(bin_dir / "python"), "-c", RUN_POD_JOB],
        input=json.dumps(
            {
                "launcher": chart_instance_config(values)["run_launcher"]["config"],
                "context": chart_container_context(values),
                "image": f"{image['repository']}:{image['tag']}",
                "kubeconfig": str(tmp_path / "kubeconfig"),
            }
        ),
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr
    pod = json.loads(checked.stdout)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
    assert pod["security_context"]["run_as_user"] == 10001
    assert pod["security_context"]["fs_group"] is None
    secret_refs = {source["secret_ref"]["name"] for source in container["env_from"] if source.get("secret_ref")}
    assert secret_refs >= set(SECRET_KEYS)
    password = next(env for env in container["env"] if env["name"] == "DAGSTER_PG_PASSWORD")
    assert password["value_from"]["secret_key_ref"] == {
        "name": values["global"]["postgresqlSecretName"],
        "key": PG_PASSWORD_KEY,
        "optional": None,
    }
    plain = {env["name"]: env["value"] for env in container["env"] if env.get("value") is not None}
    assert plain["MATCHALL_STORE"] == next(
        v["value"] for v in deployment(values)["env"] if v["name"] == "MATCHALL_STORE"
    )
    assert StoreUrl.parse(plain["MATCHALL_STORE"]).kind == "postgresql"
    assert "MATCHALL_DUCKDB_PATH" not in plain
    assert PG_SECRET in secret_refs  # PGPASSWORD
    assert not pod.get("volumes")
    assert not container.get("volume_mounts")
    with chart_code_server(bin_dir, values, tmp_path / "home", tmp_path / "grpc.log"):
        pass

"""docker-compose.yml cannot start here (no Docker engine): check it against the code instead —
services, commands (parsed by the ragpipe and Airflow CLIs), environment, volumes, ports, healthchecks."""

import re
import shlex
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

from cluster.settings import SHARED_SETTINGS, ClusterSettings
from conftest import REPO
from pipeline.cli import build_parser
from pipeline.config import IndexConfig

KNOWN_ENV = {f"RAGPIPE_{f.name.upper()}" for f in fields(IndexConfig)} | {
    "RAGPIPE_DATABASE_URL", "RAGPIPE_HOME", "RAGPIPE_SOURCE", "RAGPIPE_SCHEDULE", "RAGPIPE_REBUILD_SCHEDULE"}
AIRFLOW_SERVICES = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}


def load():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def dockerfile() -> list[str]:
    return (REPO / "Dockerfile").read_text().splitlines()


def test_services_depend_on_a_healthy_database_and_a_finished_init():
    services = load()["services"]
    assert {"postgres", "airflow-init", "ragpipe", "redis", "s3", "s3-bucket", "airflow-worker",
            *AIRFLOW_SERVICES} == set(services)
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["airflow-init"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in [*AIRFLOW_SERVICES, "ragpipe", "airflow-worker"]:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    for name in [*AIRFLOW_SERVICES, "redis", "s3", "airflow-worker"]:
        assert services[name]["healthcheck"]["test"], name
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]
    assert "8080" in " ".join(services["airflow-apiserver"]["healthcheck"]["test"])
    assert "8974/health" in " ".join(services["airflow-scheduler"]["healthcheck"]["test"])
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    # Celery only behind its profile; LocalExecutor otherwise
    for name in ("redis", "s3", "s3-bucket", "airflow-worker"):
        assert services[name]["profiles"] == ["celery"], name
    assert services["airflow-worker"]["command"] == ["airflow", "celery", "worker"]
    assert services["airflow-worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["airflow-worker"]["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert services["s3-bucket"]["depends_on"]["s3"]["condition"] == "service_healthy"
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")


def test_databases_and_the_registry_connection_match_the_postgres_service():
    services = load()["services"]
    pg = services["postgres"]["environment"]
    user, password, registry_db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    init_sql = (REPO / "docker" / "postgres-init.sql").read_text()
    mounted = {v.split(":")[0]: v.split(":")[1] for v in services["postgres"]["volumes"] if v.startswith("./")}
    assert mounted["./docker/postgres-init.sql"].startswith("/docker-entrypoint-initdb.d/")
    airflow_db = re.search(r"CREATE DATABASE (\w+)", init_sql).group(1)
    for name, service in services.items():
        if name in ("postgres", "redis", "s3"):
            continue
        env = service["environment"]
        assert env["RAGPIPE_DATABASE_URL"] == f"postgresql://{user}:{password}@postgres:5432/{registry_db}"
        # the DAGs read the registry from the Airflow Connection they name
        from_dags = re.search(r'REGISTRY_CONNECTION = "(\w+)"', (REPO / "dags" / "rag_index.py").read_text()).group(1)
        assert env[f"AIRFLOW_CONN_{from_dags.upper()}"] == env["RAGPIPE_DATABASE_URL"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
            f"postgresql+psycopg://{user}:{password}@postgres:5432/{airflow_db}")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert airflow_db != registry_db


def test_environment_volumes_and_dag_folder_match_the_code():
    compose = load()
    workdir = next(line.split()[1] for line in dockerfile() if line.startswith("WORKDIR "))
    for name, service in compose["services"].items():
        if name in ("postgres", "redis", "s3"):
            continue
        env = service["environment"]
        assert {k for k in env if k.startswith("RAGPIPE_")} <= KNOWN_ENV, name
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{workdir}/dags"  # where the Dockerfile copies dags/
        mounts = {v.split(":")[1] for v in service["volumes"]}
        if env["RAGPIPE_ARTIFACTS"].startswith("s3://"):  # Celery workers: no volume shared between them
            assert not mounts & {env["RAGPIPE_HOME"], "/opt/ragpipe/artifacts"}, name
            assert name == "s3-bucket" or env["RAGPIPE_SOURCE"] in mounts, name
            continue
        assert {env["RAGPIPE_HOME"], env["RAGPIPE_ARTIFACTS"], env["RAGPIPE_SOURCE"]} <= mounts, name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    assert set(compose["volumes"]) == {"postgres-data", "ragpipe-home", "ragpipe-artifacts"}
    assert any(line.startswith("RUN mkdir -p /opt/ragpipe/home /opt/ragpipe/artifacts") for line in dockerfile())


def test_the_celery_profile_has_the_local_clusters_settings(tmp_path):
    # `make cluster` (cluster/settings.py) and the Celery profile: the same executor settings, the same
    # drivers and URL schemes, the artifact store on S3 through the standard AWS variables
    worker = load()["services"]["airflow-worker"]["environment"]
    settings = ClusterSettings.new(tmp_path, REPO, sys.executable, postgres_url="postgresql://postgres@127.0.0.1:5432/x",
                                   redis_url="redis://127.0.0.1:6379/13")
    local = settings.environment(settings.workers[0])
    for key, value in SHARED_SETTINGS.items():
        assert str(worker[key]).lower() == value.lower(), key
        assert local[key] == value, key
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"):
        assert worker[key] == local[key], key
    def scheme(url: str) -> str:
        return url.split("://")[0]

    prefixes = ("AIRFLOW__CELERY__", "AIRFLOW__DATABASE__", "AIRFLOW__API_AUTH__", "AWS_", "AIRFLOW_CONN_")
    assert {k for k in worker if k.startswith(prefixes)} == {k for k in local if k.startswith(prefixes)}
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC",
                "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND", "RAGPIPE_ARTIFACTS",
                "AIRFLOW_CONN_RAGPIPE_REGISTRY", "RAGPIPE_DATABASE_URL"):
        assert scheme(str(worker[key])) == scheme(local[key]), key
    assert worker["AIRFLOW__CELERY__BROKER_URL"].rsplit("/", 1)[1] == local["AIRFLOW__CELERY__BROKER_URL"].rsplit("/", 1)[1]
    assert worker["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")
    assert local["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")
    # no shared local disk: each local worker has a home of its own
    homes = {settings.environment(w)["RAGPIPE_HOME"] for w in settings.workers}
    assert len(homes) == len(settings.workers) >= 2


def _commands() -> dict[str, list[str]]:
    """Every command a service runs, split into argv lists (init runs a shell `&&` chain)."""
    services = load()["services"]
    out = {}
    for name, service in services.items():
        command = service.get("command")
        if not command:
            continue
        if service.get("entrypoint"):
            command = [*service["entrypoint"], *command]
        if command[:2] == ["bash", "-c"]:
            for i, part in enumerate(command[2].split("&&")):
                out[f"{name}#{i}"] = shlex.split(part.split(">")[0])
        else:
            out[name] = command
    return out


def test_ragpipe_commands_parse_with_the_cli():
    ragpipe = {k: v for k, v in _commands().items() if v[0] == "ragpipe"}
    assert sorted(ragpipe) == ["airflow-init#1", "ragpipe"]
    for name, argv in ragpipe.items():
        build_parser().parse_args(argv[1:])  # raises SystemExit on a command the CLI does not have


@pytest.mark.slow
def test_airflow_commands_parse_with_airflow():
    airflow = {k: v for k, v in _commands().items() if v[0] == "airflow" and v[1] != "celery"}
    for name, sub in AIRFLOW_SERVICES.items():
        assert airflow[name][1] == sub
    assert airflow["airflow-init#0"] == ["airflow", "db", "migrate"]
    checks = [shlex.split(s["healthcheck"]["test"][1].replace("$${HOSTNAME}", "host"))
              for s in load()["services"].values()
              if s.get("healthcheck") and s["healthcheck"]["test"][1].startswith("airflow ")]
    assert len(checks) == 2
    argvs = [argv[1:] for argv in [*airflow.values(), *checks]]
    code = ("import json, sys\nfrom airflow.cli.cli_parser import get_parser\np = get_parser()\n"
            "for argv in json.loads(sys.argv[1]):\n    p.parse_args(argv)\nprint('ok')")
    import json

    done = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_dockerfile_keeps_airflow_and_pins_torch_before_the_project():
    lines = dockerfile()
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    project = next(i for i, line in enumerate(lines) if line.endswith('".[airflow]"'))
    assert torch < project
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in lines[project]
    assert lines[0].startswith("# ") and any(line.startswith("FROM apache/airflow:3.") for line in lines)
    for package in ["pipeline", "registry", "retrieval", "dags", "sql"]:
        assert any(line.startswith(f"COPY --chown=airflow:root {package} ") for line in lines), package

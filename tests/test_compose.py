"""docker-compose.yml cannot start here (no Docker engine): check it against the code instead —
services, commands (parsed by the ragpipe and Airflow CLIs), environment, volumes, ports, healthchecks."""

import re
import shlex
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

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
    assert {"postgres", "airflow-init", "ragpipe", "redis", "airflow-worker", *AIRFLOW_SERVICES} == set(services)
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["airflow-init"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in [*AIRFLOW_SERVICES, "ragpipe", "airflow-worker"]:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    for name in [*AIRFLOW_SERVICES, "redis", "airflow-worker"]:
        assert services[name]["healthcheck"]["test"], name
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]
    assert "8080" in " ".join(services["airflow-apiserver"]["healthcheck"]["test"])
    assert "8974/health" in " ".join(services["airflow-scheduler"]["healthcheck"]["test"])
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    # Celery only behind its profile; LocalExecutor otherwise
    assert services["redis"]["profiles"] == ["celery"] and services["airflow-worker"]["profiles"] == ["celery"]
    assert services["airflow-worker"]["command"] == ["airflow", "celery", "worker"]
    assert services["airflow-worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
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
        if name in ("postgres", "redis"):
            continue
        env = service["environment"]
        assert env["RAGPIPE_DATABASE_URL"] == f"postgresql://{user}:{password}@postgres:5432/{registry_db}"
        # the DAGs read the registry from the Airflow Connection they name
        from_dags = re.search(r'REGISTRY_CONNECTION = "(\w+)"', (REPO / "dags" / "rag_index.py").read_text()).group(1)
        assert env[f"AIRFLOW_CONN_{from_dags.upper()}"] == env["RAGPIPE_DATABASE_URL"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
            f"postgresql+psycopg2://{user}:{password}@postgres:5432/{airflow_db}")
        assert airflow_db != registry_db


def test_environment_volumes_and_dag_folder_match_the_code():
    compose = load()
    workdir = next(line.split()[1] for line in dockerfile() if line.startswith("WORKDIR "))
    for name, service in compose["services"].items():
        if name in ("postgres", "redis"):
            continue
        env = service["environment"]
        assert {k for k in env if k.startswith("RAGPIPE_")} <= KNOWN_ENV, name
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == f"{workdir}/dags"  # where the Dockerfile copies dags/
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {env["RAGPIPE_HOME"], env["RAGPIPE_ARTIFACTS"], env["RAGPIPE_SOURCE"]} <= mounts, name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    assert set(compose["volumes"]) == {"postgres-data", "ragpipe-home", "ragpipe-artifacts"}
    assert any(line.startswith("RUN mkdir -p /opt/ragpipe/home /opt/ragpipe/artifacts") for line in dockerfile())


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

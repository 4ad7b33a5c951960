"""docker-compose.yml cannot start here (no Docker engine): check it against the code instead."""

import re
from dataclasses import fields

import yaml

from conftest import REPO
from pipeline.cli import build_parser
from pipeline.config import IndexConfig

KNOWN_ENV = {f"RAGPIPE_{f.name.upper()}" for f in fields(IndexConfig)} | {"RAGPIPE_DATABASE_URL", "RAGPIPE_HOME"}


def load():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_healthchecks():
    compose = load()
    services = compose["services"]
    assert {"postgres", "ragpipe-init", "ragpipe-index"} <= set(services)
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["ragpipe-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ragpipe-index"]["depends_on"]["ragpipe-init"]["condition"] == "service_completed_successfully"


def test_commands_parse_with_the_cli_and_env_is_known():
    compose = load()
    pg = compose["services"]["postgres"]["environment"]
    for name in ["ragpipe-init", "ragpipe-index"]:
        service = compose["services"][name]
        command = service["command"]
        assert command[0] == "ragpipe"
        build_parser().parse_args(command[1:])  # raises SystemExit on a command the CLI does not have
        env = service["environment"]
        assert {k for k in env if k.startswith("RAGPIPE_")} <= KNOWN_ENV
        url = env["RAGPIPE_DATABASE_URL"]
        m = re.match(r"postgresql://(\w+):(\w+)@postgres:5432/(\w+)$", url)
        assert m and m.groups() == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert env["RAGPIPE_HOME"] in mounts
        if name == "ragpipe-index":
            assert command[2] in mounts  # the source directory is mounted
    assert set(compose["volumes"]) >= {"postgres-data", "ragpipe-home"}


def test_dockerfile_pins_torch_before_the_project():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    project = next(i for i, line in enumerate(lines) if "pip install --no-cache-dir -e ." in line)
    assert torch < project
    assert lines[0].startswith("# ") and any(line.startswith("FROM apache/airflow:3.") for line in lines)
    for package in ["pipeline", "registry", "retrieval", "dags", "sql"]:
        assert any(line.startswith(f"COPY --chown=airflow:root {package} ") for line in lines), package

"""What a local cluster is made of: ports, databases, secrets and each process's environment (pure).

One :class:`ClusterSettings` describes a cluster; ``up`` writes it to ``ROOT/cluster.json`` (mode 0600,
it holds the secrets) and every later command reads it back. The environments below are the only
place the cluster's Airflow, Celery and ragpipe settings are spelled: the processes get them, and
the docker-compose Celery profile is checked against :data:`SHARED_SETTINGS` (tests/test_compose.py).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from urllib.parse import urlsplit

WORKER_NAMES = ("worker-1", "worker-2")
BUCKET = "ragpipe-cluster"
ADMIN_USER = "admin"
SETTINGS_FILE = "cluster.json"

# Settings the local cluster and the docker-compose Celery profile share, with the same values
# wherever they do not name a host: the executor's behaviour, not the addresses.
SHARED_SETTINGS = {
    "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
    # a worker that dies takes its task's heartbeats with it: after this many seconds the scheduler
    # fails the attempt and the task's retry runs on another worker (Airflow's default is 300)
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
    # one task per worker process at a time: the embedding tasks are CPU-bound
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    # a message is acknowledged when its task ends, so a worker killed mid-task leaves it to another
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "true",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    # smaller work lists than the default 2048 texts, so that a small corpus still fans out
    "RAGPIPE_EMBED_TASK_SIZE": "128",
    "RAGPIPE_INDEX": "docs",
    "HF_HUB_OFFLINE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sqlalchemy_url(server_url: str, dbname: str, *, prefix: str = "") -> str:
    """The SQLAlchemy URL (psycopg 3 driver) of ``dbname`` on the server the libpq URL ``server_url`` names."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ValueError("the PostgreSQL server must be given as postgresql://USER@HOST:PORT/DB")
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    return f"{prefix}postgresql+psycopg://{user}{password}@{parts.hostname}:{parts.port or 5432}/{dbname}"


def libpq_url(server_url: str, dbname: str) -> str:
    """A ``postgresql://`` URL (what Airflow Connections and RAGPIPE_DATABASE_URL take) of ``dbname``."""
    return sqlalchemy_url(server_url, dbname).replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass(frozen=True)
class ClusterSettings:
    """One local cluster.

    Attributes:
        root: the cluster's directory: settings, pid files, logs, each process's working directory.
        repo: the checkout whose ``dags/`` and code every process runs.
        python: the interpreter of the environment that has Airflow, the Celery provider and ragpipe.
        cluster_id: set in every process's environment (``RAGPIPE_CLUSTER_ID``), inherited by every
            process they start, so that ``down`` finds exactly what the cluster started.
        postgres_url: a libpq URL of the PostgreSQL server; the cluster creates its two databases there.
        redis_host, redis_port, redis_db: the Celery broker: a Redis server and the database number
            the cluster keeps to itself (emptied by ``down``).
    """

    root: Path
    repo: Path
    python: str
    cluster_id: str
    postgres_url: str
    airflow_db: str
    registry_db: str
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 13
    api_port: int = 0
    scheduler_health_port: int = 0
    triggerer_log_port: int = 0
    s3_port: int = 0
    worker_log_ports: tuple[int, ...] = ()
    workers: tuple[str, ...] = WORKER_NAMES
    bucket: str = BUCKET
    jwt_secret: str = field(default="", repr=False)
    admin_password: str = field(default="", repr=False)
    aws_access_key: str = field(default="", repr=False)
    aws_secret_key: str = field(default="", repr=False)
    overrides: dict[str, str] = field(default_factory=dict)  # set in every process's environment, last

    @classmethod
    def new(cls, root: Path, repo: Path, python: str, *, postgres_url: str, redis_url: str,
            workers: int = len(WORKER_NAMES), overrides: dict[str, str] | None = None) -> "ClusterSettings":
        """Fresh settings: free loopback ports, new secrets, database names of this cluster's own."""
        cluster_id = secrets.token_hex(6)
        host, port, db = parse_redis_url(redis_url)
        return cls(
            root=root.resolve(), repo=repo.resolve(), python=python, cluster_id=cluster_id,
            postgres_url=postgres_url, airflow_db=f"ragpipe_cluster_{cluster_id}_airflow",
            registry_db=f"ragpipe_cluster_{cluster_id}", redis_host=host, redis_port=port, redis_db=db,
            api_port=free_port(), scheduler_health_port=free_port(), triggerer_log_port=free_port(),
            s3_port=free_port(), worker_log_ports=tuple(free_port() for _ in range(workers)),
            workers=tuple(f"worker-{i + 1}" for i in range(workers)),
            jwt_secret=secrets.token_urlsafe(32), admin_password=secrets.token_urlsafe(12),
            aws_access_key="AKIA" + secrets.token_hex(8).upper(), aws_secret_key=secrets.token_urlsafe(30),
            overrides=dict(overrides or {}),
        )

    # -- where things are ------------------------------------------------------------------------

    @property
    def settings_file(self) -> Path:
        return self.root / SETTINGS_FILE

    def pid_file(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def workdir(self, name: str) -> Path:
        """A process's own working directory; a worker's holds its RAGPIPE_HOME and AIRFLOW_HOME."""
        return self.root / ("workers" if name in self.workers else "control") / name

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def artifacts(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    @property
    def sources(self) -> str:
        """Where ``run`` uploads the documents it indexes."""
        return f"s3://{self.bucket}/sources/docs/"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def registry_url(self) -> str:
        return libpq_url(self.postgres_url, self.registry_db)

    # -- environments ----------------------------------------------------------------------------

    def aws_environment(self) -> dict[str, str]:
        """The S3 server's address and the cluster's key pair, as the standard AWS variables."""
        return {"AWS_ACCESS_KEY_ID": self.aws_access_key, "AWS_SECRET_ACCESS_KEY": self.aws_secret_key,
                "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_REGION": "us-east-1"}

    def ragpipe_environment(self) -> dict[str, str]:
        """What the ragpipe CLI needs to reach the cluster's registry and artifact store."""
        return {**self.aws_environment(), "RAGPIPE_DATABASE_URL": self.registry_url,
                "RAGPIPE_ARTIFACTS": self.artifacts, "RAGPIPE_INDEX": SHARED_SETTINGS["RAGPIPE_INDEX"],
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(self.repo)}

    def environment(self, name: str) -> dict[str, str]:
        """The full environment of the process ``name`` (``api-server``, ``scheduler``, a worker, ...)."""
        workdir = self.workdir(name)
        env = {
            **SHARED_SETTINGS,
            **self.ragpipe_environment(),
            "RAGPIPE_CLUSTER_ID": self.cluster_id,
            "RAGPIPE_HOME": str(workdir / "home"),
            "AIRFLOW_HOME": str(workdir / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.root / "passwords.json"),
            # task instances record the worker's name, not the machine's (all share one here)
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "cluster.identity.process_name",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(self.postgres_url, self.airflow_db),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": sqlalchemy_url(self.postgres_url, self.airflow_db),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(self.scheduler_health_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.triggerer_log_port),
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": sqlalchemy_url(self.postgres_url, self.airflow_db, prefix="db+"),
            "AIRFLOW_CONN_RAGPIPE_REGISTRY": self.registry_url,
            "RAGPIPE_PROCESS_NAME": name,
            # runs only when triggered (``run``, the tests): no hourly run beside them
            "RAGPIPE_SCHEDULE": "none",
            "RAGPIPE_REBUILD_SCHEDULE": "none",
        }
        if name in self.workers:
            port = self.worker_log_ports[self.workers.index(name)]
            env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(port)
        return {**env, **self.overrides}

    # -- saved form ------------------------------------------------------------------------------

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}
        fd = os.open(self.settings_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)

    @classmethod
    def load(cls, root: Path) -> "ClusterSettings":
        data: dict[str, Any] = json.loads((root / SETTINGS_FILE).read_text())
        for f in fields(cls):
            if f.name in ("root", "repo"):
                data[f.name] = Path(data[f.name])
            elif f.name in ("worker_log_ports", "workers"):
                data[f.name] = tuple(data[f.name])
        return cls(**data)


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """(host, port, database number) of ``redis://HOST:PORT/DB``."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"not a redis:// URL: {url!r}")
    db = parts.path.strip("/") or "0"
    return parts.hostname, parts.port or 6379, int(db)

"""Start, use and stop a local Airflow 3 cluster: api-server, scheduler, dag-processor, triggerer,
Celery workers (Redis broker, PostgreSQL metadata) and moto's S3 server as the artifact store.

``up`` creates the cluster's two databases (Airflow's metadata, the ragpipe registry), migrates
them, starts every process and waits on each one's health check; ``run`` uploads this checkout's
documentation to the S3 server, triggers ``rag_index`` over it through the REST API and reports
which worker ran each task; ``down`` stops every process the cluster started, empties its Redis
database, drops its databases and removes its directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cluster import processes
from cluster.api import AirflowClient, ApiError, TaskTry
from cluster.processes import ClusterError
from cluster.settings import ADMIN_USER, ClusterSettings

DAG_ID = "rag_index"
CONTROL_PLANE = ("api-server", "scheduler", "dag-processor", "triggerer")
DOC_PATTERNS = ("*.md", "*.rst")
Say = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


def command(settings: ClusterSettings, name: str) -> list[str]:
    """The command line of the cluster process ``name``."""
    py = settings.python
    if name == "s3":
        return [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(settings.s3_port)]
    if name == "api-server":
        return [py, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(settings.api_port),
                "--workers", "1"]
    if name in ("scheduler", "dag-processor", "triggerer"):
        return [py, "-m", "airflow", name]
    if name in settings.workers:
        return [py, "-m", "airflow", "celery", "worker", "--celery-hostname", f"{name}@ragpipe",
                "--concurrency", "1", "--skip-serve-logs", "--without-mingle", "--without-gossip"]
    raise ValueError(f"no cluster process named {name!r}")


def client(settings: ClusterSettings) -> AirflowClient:
    return AirflowClient(settings.api_url, ADMIN_USER, settings.admin_password)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(200 <= response.status < 300)


def _healthy(settings: ClusterSettings, part: str) -> bool:
    return client(settings).health().get(part, {}).get("status") == "healthy"


def start_component(settings: ClusterSettings, name: str, *, extra_env: dict[str, str] | None = None) -> Callable[[], bool]:
    """Start one process; return the check that tells when it is ready."""
    log = settings.log_file(name)
    offset = log.stat().st_size if log.exists() else 0
    processes.start(settings, name, command(settings, name), extra_env=extra_env)
    if name == "s3":
        return lambda: _http_ok(settings.s3_endpoint + "/")
    if name == "api-server":
        return lambda: _http_ok(settings.api_url + "/api/v2/monitor/health")
    if name == "scheduler":
        return lambda: _http_ok(f"http://127.0.0.1:{settings.scheduler_health_port}/health")
    if name == "dag-processor":
        return lambda: client(settings).dag(DAG_ID) is not None
    if name == "triggerer":
        return lambda: _healthy(settings, "triggerer")
    return lambda: processes.log_contains(log, " ready.", after=offset)  # Celery: "celery@NAME ready."


def start_and_wait(settings: ClusterSettings, names: Iterable[str], *, timeout_s: float = 300.0,
                   extra_env: dict[str, str] | None = None) -> None:
    """Start the processes ``names`` together, then wait until each is ready."""
    checks = {name: start_component(settings, name, extra_env=extra_env) for name in names}
    for name, ready in checks.items():
        processes.wait_until(settings, name, ready, timeout_s=timeout_s, what="a passing health check")


def _run_step(settings: ClusterSettings, name: str, argv: list[str], *, env: dict[str, str]) -> None:
    settings.log_file(name).parent.mkdir(parents=True, exist_ok=True)
    with open(settings.log_file(name), "ab") as log:
        done = subprocess.run(argv, env={**processes.base_environment(), **env}, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600,
                              cwd=settings.root)
    if done.returncode != 0:
        raise ClusterError(f"{' '.join(argv[2:5])} failed (log {settings.log_file(name)}):\n"
                           f"{processes.log_tail(settings, name)}")


def _object_store(settings: ClusterSettings) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key=settings.aws_access_key, secret=settings.aws_secret_key,
                             endpoint_url=settings.s3_endpoint, client_kwargs={"region_name": "us-east-1"})


def _create_bucket(settings: ClusterSettings) -> None:
    from pyarrow import fs

    store = fs.S3FileSystem(access_key=settings.aws_access_key, secret_key=settings.aws_secret_key,
                            endpoint_override=settings.s3_endpoint, region="us-east-1", allow_bucket_creation=True)
    store.create_dir(settings.bucket)


def _redis(settings: ClusterSettings) -> Any:
    import redis

    return redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db,
                       socket_timeout=5)


def up(root: Path, repo: Path, *, postgres_url: str, redis_url: str, workers: int = 2,
       python: str = sys.executable, overrides: dict[str, str] | None = None, say: Say = _say) -> ClusterSettings:
    """Start a cluster under ``root``; a cluster left there before is stopped first.

    Raises:
        ClusterError: a process did not start or become healthy (everything started is stopped again).
    """
    if (root / "cluster.json").exists():
        say(f"stopping the cluster left in {root}")
        down(root, say=say)
    started = time.monotonic()
    settings = ClusterSettings.new(root, repo, python, postgres_url=postgres_url, redis_url=redis_url,
                                   workers=workers, overrides=overrides)
    settings.save()
    try:
        _prepare(settings, say)
        say("starting the S3 server")
        start_and_wait(settings, ["s3"], timeout_s=60)
        _create_bucket(settings)
        say(f"starting {', '.join(CONTROL_PLANE)} and {', '.join(settings.workers)}")
        start_and_wait(settings, [*CONTROL_PLANE, *settings.workers])
    except BaseException:
        say("the cluster did not start; stopping what did")
        down(root, say=lambda m: None)
        raise
    say(f"cluster up in {time.monotonic() - started:.0f} s: Airflow {settings.api_url} ({ADMIN_USER}, password in "
        f"{settings.root / 'passwords.json'}), artifacts {settings.artifacts} at {settings.s3_endpoint}, broker "
        f"{settings.broker_url}, logs {settings.root / 'logs'}")
    return settings


def _prepare(settings: ClusterSettings, say: Say) -> None:
    """Databases (created and migrated), the admin's password file, an empty broker database."""
    from registry.db import create_database

    say(f"creating databases {settings.airflow_db} and {settings.registry_db}")
    create_database(settings.postgres_url, settings.airflow_db)
    create_database(settings.postgres_url, settings.registry_db)
    passwords = settings.root / "passwords.json"
    passwords.touch(mode=0o600)
    passwords.write_text(json.dumps({ADMIN_USER: settings.admin_password}))
    _redis(settings).flushdb()
    say("migrating Airflow's metadata and the ragpipe registry")
    env = settings.environment("init")
    _run_step(settings, "init", [settings.python, "-m", "airflow", "db", "migrate"], env=env)
    _run_step(settings, "init", [settings.python, "-m", "pipeline.cli", "db", "upgrade"], env=env)


def down(root: Path, *, say: Say = _say) -> None:
    """Stop every process of the cluster under ``root`` and remove all it made; nothing when none is there."""
    try:
        settings = ClusterSettings.load(root)
    except FileNotFoundError:
        say(f"no cluster in {root}")
        return
    count = processes.stop(settings)
    problems = []
    try:
        _redis(settings).flushdb()
    except Exception as exc:  # the broker down: nothing of ours is left in it to remove  # noqa: BLE001
        problems.append(f"redis db {settings.redis_db} not emptied ({type(exc).__name__})")
    from registry.db import drop_database

    for name in (settings.airflow_db, settings.registry_db):
        try:
            drop_database(settings.postgres_url, name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"database {name} not dropped ({type(exc).__name__}: {exc})")
    shutil.rmtree(settings.root, ignore_errors=True)
    say(f"cluster down: {count} processes stopped, databases dropped, {root} removed"
        + (f"; {'; '.join(problems)}" if problems else ""))


# -- a run over this checkout's documentation -------------------------------------------------------


def documentation(repo: Path) -> list[Path]:
    """This checkout's documentation files (what ``make run`` indexes), relative to ``repo``."""
    listed = subprocess.run(["git", "ls-files", "--", *DOC_PATTERNS], cwd=repo, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return sorted(Path(line) for line in listed.stdout.splitlines() if (repo / line).is_file())
    return sorted(p.relative_to(repo) for pattern in DOC_PATTERNS for p in repo.rglob(pattern)
                  if not any(part.startswith(".") for part in p.relative_to(repo).parts))


def upload_documentation(settings: ClusterSettings) -> int:
    """Copy the documentation into the S3 server under ``settings.sources``; objects whose content
    is already there are left as they are (so that a second run finds nothing changed). Returns how
    many objects were written."""
    store = _object_store(settings)
    prefix = settings.sources[len("s3://"):]
    written = 0
    for rel in documentation(settings.repo):
        body = (settings.repo / rel).read_bytes()
        key = f"{prefix}{rel.as_posix()}"
        try:
            same = store.info(key).get("ETag", "").strip('"') == hashlib.md5(body).hexdigest()  # noqa: S324
        except FileNotFoundError:
            same = False
        if not same:
            store.pipe(key, body)
            written += 1
    return written


def run(root: Path, *, timeout_s: float = 900.0, conf: dict[str, Any] | None = None, say: Say = _say) -> dict[str, Any]:
    """Trigger ``rag_index`` over the documentation in the S3 server and wait for it.

    Returns:
        {"dag_run_id", "state", "workers": the workers that ran its tasks, "artifacts": the store's URI,
        "tries": every attempt of every task}.
    """
    settings = ClusterSettings.load(root)
    api = client(settings)
    written = upload_documentation(settings)
    say(f"{written} documents uploaded to {settings.sources}")
    api.unpause(DAG_ID)
    run_conf = {"source": settings.sources, "index": "docs", **(conf or {})}
    run_id = api.trigger(DAG_ID, run_conf)
    say(f"triggered {DAG_ID} run {run_id}; waiting")
    started = time.monotonic()
    state = api.wait_for_run(DAG_ID, run_id, timeout_s=timeout_s)
    tries = api.tries(DAG_ID, run_id)
    say(f"{DAG_ID} {run_id}: {state} in {time.monotonic() - started:.0f} s")
    for line in task_table(tries):
        say(line)
    summary = subprocess.run([settings.python, "-m", "pipeline.cli", "runs", "list", "--index", "docs", "--limit", "1"],
                             env={**processes.base_environment(), **settings.ragpipe_environment()},
                             capture_output=True, text=True, timeout=120)
    say(summary.stdout.rstrip() or summary.stderr.strip()[-500:])
    workers = sorted({t.hostname for t in tries if t.hostname})
    return {"dag_run_id": run_id, "state": state, "workers": workers, "artifacts": settings.artifacts,
            "tries": [t.__dict__ for t in tries]}


def task_table(tries: list[TaskTry]) -> list[str]:
    """One line per attempt: task, try, state, worker, seconds."""
    lines = [f"{'task':<22} {'try':>3}  {'state':<16} {'worker':<10} {'seconds':>7}"]
    for t in tries:
        seconds = f"{t.duration:.1f}" if t.duration is not None else "-"
        lines.append(f"{t.label:<22} {t.try_number:>3}  {t.state or '-':<16} {t.hostname or '-':<10} {seconds:>7}")
    return lines


def status(root: Path) -> dict[str, Any]:
    """Which of the cluster's processes are running (and how many processes each has)."""
    settings = ClusterSettings.load(root)
    names = ["s3", *CONTROL_PLANE, *settings.workers]
    return {name: {"running": processes.is_running(settings, name), "processes": len(processes.tagged(settings, name))}
            for name in names}


__all__ = ["ApiError", "ClusterError", "client", "command", "down", "run", "start_and_wait", "status", "up"]

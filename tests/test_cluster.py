"""The local cluster (`make cluster`): its settings and process bookkeeping, and faults against a real
running cluster — api-server, scheduler, dag-processor, triggerer, two Celery workers with homes of
their own, Redis, PostgreSQL and moto's S3 server, started and stopped by the same code as the
Makefile's targets. Each fault: the run ends succeeded (or cleanly failed, and the next run
converges), `ragpipe verify` is clean, and the embedding cache shows nothing embedded twice."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from cluster import control, processes
from cluster.api import TaskTry
from cluster.settings import ClusterSettings, sqlalchemy_url
from conftest import REPO

POSTGRES = os.environ.get("RAGPIPE_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_REDIS = "redis://127.0.0.1:6379/14"  # not the Makefile's database: a `make cluster` may run beside
# faster failure detection than a deployment wants, so that each fault takes a minute or two
FAST = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
}


def new_settings(tmp_path: Path) -> ClusterSettings:
    return ClusterSettings.new(tmp_path / "c", REPO, sys.executable, postgres_url=POSTGRES, redis_url=TEST_REDIS)


# -- settings and bookkeeping (no cluster) --------------------------------------------------------------


def test_settings_round_trip_privately_and_keep_secrets_out_of_their_repr(tmp_path):
    settings = new_settings(tmp_path)
    settings.save()
    assert ClusterSettings.load(settings.root) == settings
    assert stat.S_IMODE(settings.settings_file.stat().st_mode) == 0o600
    for secret in (settings.jwt_secret, settings.admin_password, settings.aws_secret_key, settings.aws_access_key):
        assert secret and secret not in repr(settings)
    ports = [settings.api_port, settings.scheduler_health_port, settings.triggerer_log_port, settings.s3_port,
             *settings.worker_log_ports]
    assert len(set(ports)) == len(ports)


def test_each_worker_has_its_own_home_and_name_and_every_process_the_same_cluster(tmp_path):
    settings = new_settings(tmp_path)
    envs = {name: settings.environment(name) for name in ["api-server", "scheduler", *settings.workers]}
    homes = {env["RAGPIPE_HOME"] for env in envs.values()}
    assert len(homes) == len(envs)  # no local disk shared
    assert all(env["RAGPIPE_ARTIFACTS"] == f"s3://{settings.bucket}/artifacts" for env in envs.values())
    assert {env["RAGPIPE_PROCESS_NAME"] for env in envs.values()} == set(envs)
    assert len({env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] for n, env in envs.items() if n in settings.workers}) == 2
    assert {env["AIRFLOW__CELERY__BROKER_URL"] for env in envs.values()} == {TEST_REDIS}
    assert sqlalchemy_url("postgresql://u:pw@db:6543/x", "air", prefix="db+") == "db+postgresql+psycopg://u:pw@db:6543/air"


def test_processes_are_found_by_their_directory_and_tag_also_after_setproctitle(tmp_path):
    settings = new_settings(tmp_path)
    code = ("import setproctitle, time, subprocess, sys\n"
            "setproctitle.setproctitle('airflow fake -- ' + 'x' * 64)\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "time.sleep(60)\n")
    pid = processes.start(settings, "scheduler", [sys.executable, "-c", code])
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=settings.workdir("scheduler"))
    try:
        deadline = time.monotonic() + 20
        while len(processes.tagged(settings, "scheduler")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = {p.pid for p in processes.tagged(settings, "scheduler")}
        assert pid in found and len(found) == 2 and outsider.pid not in found  # its grandchild too, not others
        assert processes.is_running(settings, "scheduler")
        assert processes.stop(settings, "scheduler", grace_s=5) == 2
        assert not processes.tagged(settings) and not processes.is_running(settings, "scheduler")
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_down_without_a_cluster_says_so(tmp_path, capsys):
    control.down(tmp_path / "none")
    assert "no cluster" in capsys.readouterr().out


def test_the_task_table_names_the_worker_of_every_try():
    lines = control.task_table([TaskTry("embed", 0, 1, "failed", "worker-1", 3.5),
                                TaskTry("embed", 0, 2, "success", "worker-2", 9.0)])
    assert "embed[0]" in lines[1] and "worker-1" in lines[1] and "worker-2" in lines[2]


# -- faults against a running cluster ---------------------------------------------------------------

WORDS = ("flutter drag lift wing spar rib aileron vortex shock boundary layer laminar turbulent nozzle "
         "thrust pressure gradient heat flux ablation shield reentry corridor stall buffet trim elevator "
         "rudder flap slat camber chord span sweep dihedral mach reynolds prandtl viscosity density").split()


def corpus(tag: str, documents: int, sections: int) -> dict[str, str]:
    """Documents of ``sections`` sections of about 120 words each, unique to ``tag`` (so that their
    chunk texts are in no cache yet)."""
    rng = random.Random(tag)
    out = {}
    for d in range(documents):
        parts = [f"# {tag} report {d}"]
        for s in range(sections):
            words = " ".join(rng.choice(WORDS) for _ in range(120))
            parts.append(f"## Section {s} of {tag}\n\n{tag}{d}x{s} {words}.")
        out[f"report-{d}.md"] = "\n\n".join(parts) + "\n"
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for every fault test of this module, started and stopped as `make cluster` does."""
    root = tmp_path_factory.mktemp("cluster")
    settings = control.up(root, REPO, postgres_url=POSTGRES, redis_url=TEST_REDIS, overrides=FAST)
    yield settings
    try:
        assert_no_credentials_anywhere(settings)
    finally:
        control.down(root)
    assert not processes.tagged(settings), "cluster-down left processes behind"
    assert not root.exists()


def assert_no_credentials_anywhere(settings: ClusterSettings) -> None:
    """The object store's secret key is in no log, task log or working file of any process, in no
    XCom and in no registry row (only the cluster's own settings file holds it)."""
    secret = settings.aws_secret_key.encode()
    for path in settings.root.rglob("*"):
        if path.is_file() and path != settings.settings_file and secret in path.read_bytes():
            raise AssertionError(f"the secret key is in {path}")
    airflow_db = settings.registry_url.rsplit("/", 1)[0] + f"/{settings.airflow_db}"
    with psycopg.connect(airflow_db) as conn:
        assert conn.execute("SELECT count(*) FROM xcom").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM xcom WHERE value::text LIKE %s",
                            (f"%{settings.aws_secret_key}%",)).fetchone()[0] == 0
    with psycopg.connect(settings.registry_url) as conn:
        rows = conn.execute("SELECT counts::text || coalesce(state::text, '') || coalesce(error, '') FROM runs").fetchall()
        assert rows and not any(settings.aws_secret_key in r[0] for r in rows)


def upload(settings: ClusterSettings, prefix: str, files: dict[str, str]) -> str:
    store = control._object_store(settings)
    for name, body in files.items():
        store.pipe(f"{settings.bucket}/sources/{prefix}/{name}", body.encode())
    return f"s3://{settings.bucket}/sources/{prefix}/"


def trigger(settings: ClusterSettings, source: str, index: str) -> str:
    api = control.client(settings)
    api.unpause(control.DAG_ID)
    return api.trigger(control.DAG_ID, {"source": source, "index": index})


def wait_for_running_embed(settings: ClusterSettings, run_id: str, timeout_s: float = 300) -> dict:
    api, deadline = control.client(settings), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = [ti for ti in api.task_instances(control.DAG_ID, run_id)
                   if ti["task_id"] == "embed" and ti["state"] == "running"]
        if running:
            return running[0]
        time.sleep(0.5)
    raise AssertionError(f"no embed task of {run_id} ran within {timeout_s} s")


def wait_for_run(settings: ClusterSettings, run_id: str, timeout_s: float = 600) -> str:
    return control.client(settings).wait_for_run(control.DAG_ID, run_id, timeout_s=timeout_s)


def verify(settings: ClusterSettings, index: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**processes.base_environment(), **settings.ragpipe_environment(), "RAGPIPE_HOME": str(tmp_path / "verifier")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "--index", index], env=env,
                          capture_output=True, text=True, timeout=300)


def cache_counts(settings: ClusterSettings, index: str) -> dict:
    """The index's distinct live chunk texts, how many of them the embedding cache holds, and what its
    last run says it embedded and found cached."""
    with psycopg.connect(settings.registry_url) as conn:
        distinct, model = conn.execute(
            "SELECT count(DISTINCT c.chunk_hash), max(v.model_id) FROM chunks c JOIN index_versions v"
            " ON v.index_name = c.index_name AND v.version = c.version WHERE c.index_name = %s AND c.status = 'active'",
            (index,)).fetchone()
        cached = conn.execute(
            "SELECT count(*) FROM embeddings WHERE model_id = %s AND chunk_hash IN"
            " (SELECT chunk_hash FROM chunks WHERE index_name = %s AND status = 'active')", (model, index)).fetchone()[0]
        counts = conn.execute("SELECT counts FROM runs WHERE index_name = %s ORDER BY run_id DESC LIMIT 1",
                              (index,)).fetchone()[0]
    return {"distinct": distinct, "cached": cached, **counts["embedding"]}


def stored_from_batch(settings: ClusterSettings, index: str, map_index: int) -> int:
    """How many texts of the work list of embedding task ``map_index`` (of the index's running run)
    the cache holds now."""
    import pyarrow.parquet as pq

    with psycopg.connect(settings.registry_url) as conn:
        state = conn.execute("SELECT state FROM runs WHERE index_name = %s AND status = 'running'"
                             " ORDER BY run_id DESC LIMIT 1", (index,)).fetchone()[0]
        with control._object_store(settings).open(state["batches"][map_index].removeprefix("s3://")) as fh:
            hashes = pq.read_table(fh, columns=["chunk_hash"]).column("chunk_hash").to_pylist()
        return int(conn.execute("SELECT count(*) FROM embeddings WHERE chunk_hash = ANY(%s)", (hashes,)).fetchone()[0])


def assert_converged(settings: ClusterSettings, index: str, tmp_path: Path) -> dict:
    checked = verify(settings, index, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    counts = cache_counts(settings, index)
    assert counts["distinct"] > 0 and counts["cached"] == counts["distinct"]
    assert counts["chunks_embedded"] + counts["chunks_cached"] == counts["distinct"]  # each text embedded once
    return counts


@pytest.mark.slow
def test_a_worker_killed_mid_embedding_is_retried_on_the_other_worker(cluster, tmp_path):
    settings = cluster
    source = upload(settings, "kill", corpus(f"kill{uuid.uuid4().hex[:6]}", documents=6, sections=50))
    pause = settings.workdir("worker-1") / "paused"
    processes.stop(settings, "worker-1")  # worker-1 again, pausing in its first embedding task
    control.start_and_wait(settings, ["worker-1"], extra_env={"RAGPIPE_TEST_PAUSE_AT": "embed_batch_stored",
                                                              "RAGPIPE_TEST_PAUSE_FILE": str(pause)})
    run_id = trigger(settings, source, "kill")
    deadline = time.monotonic() + 300
    while not pause.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pause.exists(), "worker-1 never reached an embedding batch"
    (paused,) = [ti for ti in control.client(settings).task_instances(control.DAG_ID, run_id)
                 if ti["task_id"] == "embed" and ti["state"] == "running" and ti["hostname"] == "worker-1"]
    stored_by_killed = stored_from_batch(settings, "kill", int(paused["map_index"]))  # before worker-1 dies
    assert processes.kill(settings, "worker-1") >= 2  # the worker and its task process: its machine is gone
    try:
        assert wait_for_run(settings, run_id) == "success"
    finally:
        pause.unlink(missing_ok=True)
        control.start_and_wait(settings, ["worker-1"])
    tries = control.client(settings).tries(control.DAG_ID, run_id)
    killed = [t for t in tries if (t.task_id, t.map_index, t.try_number) == ("embed", int(paused["map_index"]), 1)]
    assert killed and killed[0].hostname == "worker-1" and killed[0].state != "success", tries
    retried = [t for t in tries if (t.task_id, t.map_index) == ("embed", killed[0].map_index) and t.try_number > 1]
    assert retried and retried[-1].state == "success" and retried[-1].hostname == "worker-2", tries
    counts = assert_converged(settings, "kill", tmp_path)
    # the killed attempt's first batch stayed cached; its retry embedded only the rest of the work list
    assert 0 < stored_by_killed < 128 and counts["chunks_cached"] == stored_by_killed


@pytest.mark.slow
def test_the_scheduler_killed_mid_run_and_restarted_finishes_the_run(cluster, tmp_path):
    settings = cluster
    source = upload(settings, "sched", corpus(f"sched{uuid.uuid4().hex[:6]}", documents=4, sections=40))
    run_id = trigger(settings, source, "sched")
    wait_for_running_embed(settings, run_id)
    assert processes.kill(settings, "scheduler") >= 1
    time.sleep(5)
    control.start_and_wait(settings, ["scheduler"])
    assert wait_for_run(settings, run_id) == "success"
    assert_converged(settings, "sched", tmp_path)


@pytest.mark.slow
def test_the_object_store_unreachable_for_30_s_mid_run(cluster, tmp_path):
    settings = cluster
    source = upload(settings, "s3down", corpus(f"s3down{uuid.uuid4().hex[:6]}", documents=4, sections=40))
    run_id = trigger(settings, source, "s3down")
    wait_for_running_embed(settings, run_id)
    # moto keeps its objects in memory: the server is frozen (it accepts no request), not restarted
    processes.kill(settings, "s3", signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        with pytest.raises(OSError):  # unreachable indeed: no answer
            urllib.request.urlopen(settings.s3_endpoint + "/", timeout=3)
        time.sleep(max(0.0, 30 - (time.monotonic() - frozen)))
    finally:
        processes.kill(settings, "s3", signal.SIGCONT)
    state = wait_for_run(settings, run_id)
    assert state in ("success", "failed")
    print("tries:", *control.task_table(control.client(settings).tries(control.DAG_ID, run_id)), sep="\n")
    if state == "failed":  # cleanly: the next run converges
        assert wait_for_run(settings, trigger(settings, source, "s3down")) == "success"
    assert_converged(settings, "s3down", tmp_path)


@pytest.mark.slow
def test_redis_restarted_mid_run(cluster, tmp_path):
    settings = cluster
    source = upload(settings, "redis", corpus(f"redis{uuid.uuid4().hex[:6]}", documents=4, sections=40))
    run_id = trigger(settings, source, "redis")
    wait_for_running_embed(settings, run_id)
    # the broker as the cluster sees a restart of a Redis that keeps nothing on disk: every connection
    # to its database dropped and the database empty (the server itself is shared with others here)
    broker = control._redis(settings)
    own = broker.client_id()
    dropped = [c["id"] for c in broker.client_list() if int(c.get("db", -1)) == settings.redis_db and int(c["id"]) != own]
    assert dropped  # the scheduler's and the workers' connections
    broker.flushdb()
    for client_id in dropped:
        broker.client_kill_filter(_id=client_id)
    assert wait_for_run(settings, run_id) == "success"
    assert_converged(settings, "redis", tmp_path)

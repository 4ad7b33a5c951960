"""Dropped database connections: the retriever and the registry reconnect with backoff, a run that
loses its connection stops with a transient error (exit 75) and the next run converges; database
URLs and passwords never reach a message or a command line."""

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from psycopg import conninfo, sql

from conftest import REPO, write_tree
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from registry import Registry, RegistryConfig
from registry import db as registry_db
from registry import errors as registry_errors
from registry.errors import RegistryError
from retrieval import Retriever

pytestmark = pytest.mark.db


def dbname(url):
    return conninfo.conninfo_to_dict(url)["dbname"]


def backends(server_url, database_url):
    """(pid, application_name) of every session on the test's database."""
    with registry_db.connect(server_url, autocommit=True) as admin:
        return admin.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname(database_url),),
        ).fetchall()


def terminate(server_url, database_url):
    """pg_terminate_backend every session on the test's database; return how many went."""
    with registry_db.connect(server_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname(database_url),),
        ).fetchall()
    deadline = time.monotonic() + 5
    while backends(server_url, database_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sum(1 for r in rows if r[0])


def allow_connections(server_url, database_url, allowed):
    """Open or close the test's database to new connections (an outage that lasts, for everyone)."""
    with registry_db.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(dbname(database_url)), sql.SQL("true" if allowed else "false")))


def publish(root, registry_config, embedder):
    with Registry.open(registry_config, migrate=False) as registry:
        return run_index(str(root), registry, embedder, IndexConfig(lock_timeout=5)).version


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


# -- the retriever ---------------------------------------------------------------------------------


def test_retriever_follows_its_alias_after_its_connections_are_dropped(
        tmp_path, server_url, database_url, registry_config, embedder, caplog):
    src = write_tree(tmp_path / "src", {"wings.txt": "Wings generate lift from pressure differences.\n"})
    first = publish(src, registry_config, embedder)
    with Retriever.open("docs", database_url, home=registry_config.home, encoder=embedder, follow=True,
                        poll_interval=1.0) as retriever:
        assert wait_for(lambda: len(backends(server_url, database_url)) >= 2, 10)  # registry and listener
        caplog.set_level(logging.WARNING)
        allow_connections(server_url, database_url, False)
        try:
            assert terminate(server_url, database_url) >= 2
            outage_started = time.monotonic()
            hits = retriever.search("lift from wings", k=1)  # the loaded version keeps answering
            assert hits and hits[0].index_version == first
            time.sleep(2.0)
            assert retriever.search("lift from wings", k=1)[0].index_version == first
            attempts = [r for r in caplog.records if "reconnect" in r.getMessage()]
            outage = time.monotonic() - outage_started
        finally:
            allow_connections(server_url, database_url, True)
        assert 1 <= len(attempts) <= 2 + outage / 0.1  # it keeps trying, backing off: never a busy loop
        (src / "wings.txt").write_text("Swept wings delay compressibility drag.\n")
        second = publish(src, registry_config, embedder)
        assert wait_for(lambda: retriever.version == second, 15), "the retriever stayed on a stale version"
        assert retriever.search("compressibility drag", k=1)[0].index_version == second


def test_retriever_refresh_survives_a_dropped_registry_connection(
        tmp_path, server_url, database_url, registry_config, embedder):
    src = write_tree(tmp_path / "src", {"heat.txt": "Heat shields protect capsules during reentry.\n"})
    first = publish(src, registry_config, embedder)
    with Retriever.open("docs", database_url, home=registry_config.home, encoder=embedder,
                        follow=False) as retriever:
        assert retriever.version == first
        (src / "heat.txt").write_text("Ablative heat shields char and erode.\n")
        second = publish(src, registry_config, embedder)
        assert terminate(server_url, database_url) >= 1
        assert retriever.refresh() and retriever.version == second  # an idempotent read, retried


# -- the registry --------------------------------------------------------------------------------


def test_registry_reconnects_for_reads_but_never_under_a_lost_lock(server_url, database_url, registry_config):
    with Registry.open(registry_config, migrate=False) as registry:
        assert registry.list_aliases() == []
        assert terminate(server_url, database_url) == 1
        assert registry.read(registry.list_aliases) == []  # reconnected and read again

        with registry.index_lock("docs", timeout_s=1):
            assert terminate(server_url, database_url) == 1
            # the session lock went with the connection: no silent retry, a transient error naming it
            with pytest.raises(registry_errors.ConnectionLost, match="index lock.*retry") as lost:
                registry.read(registry.list_aliases)
            assert lost.value.transient
            with pytest.raises(registry_errors.ConnectionLost):
                registry.start_run("docs", "src")
        # leaving the block: the lock is free for others, and this registry connects again
        with Registry.open(registry_config, migrate=False) as other, other.index_lock("docs", timeout_s=0.5):
            pass
        assert registry.list_aliases() == []
        with registry.index_lock("docs", timeout_s=0.5):
            pass


def test_reconnecting_gives_up_after_its_budget(database_url, server_url, registry_config):
    with Registry.open(registry_config, migrate=False) as registry:
        registry.reconnect_backoff = registry_db.Backoff(initial=0.05, maximum=0.2, budget=1.0)
        allow_connections(server_url, database_url, False)
        try:
            terminate(server_url, database_url)
            started = time.monotonic()
            with pytest.raises(RegistryError, match="retry") as failed:
                registry.read(registry.list_aliases)
            took = time.monotonic() - started
        finally:
            allow_connections(server_url, database_url, True)
    assert failed.value.transient
    assert 0.5 <= took <= 3.0


def test_backoff_grows_to_its_cap_with_jitter_within_its_budget():
    backoff = registry_db.Backoff(initial=0.1, maximum=1.0, budget=5.0)
    delays = list(backoff.delays())
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert sum(delays) <= 5.0 + 1.0
    assert delays[-1] > 0.5 and delays[0] <= 0.1  # exponential up to the cap
    assert len(set(delays)) > 1
    assert len(list(registry_db.Backoff(initial=0.1, maximum=1.0, budget=None).delays(limit=50))) == 50


# -- the pipeline --------------------------------------------------------------------------------


def ragpipe(args, database_url, home, pause_at=None, pause_file=None):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_BATCH_SIZE="2",
               RAGPIPE_HOME=str(home))
    for name in ("RAGPIPE_TEST_KILL_AT", "RAGPIPE_TEST_PAUSE_AT", "RAGPIPE_TEST_PAUSE_FILE"):
        env.pop(name, None)
    if pause_at:
        env.update(RAGPIPE_TEST_PAUSE_AT=pause_at, RAGPIPE_TEST_PAUSE_FILE=str(pause_file))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("point", ["staged", "embed_batch_stored", "publishing"])
def test_database_lost_mid_run_exits_75_and_the_next_run_converges(tmp_path, server_url, database_url, point):
    home = tmp_path / "home"
    src = write_tree(tmp_path / "src", {f"doc{i}.txt": f"Report {i} on the nozzle at Mach {i}.\n" for i in range(6)})
    rc, out, err = finished(ragpipe(["index", str(src), "--json"], database_url, home))
    assert rc == 0, err
    live = json.loads(out)["version"]
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"Revised report {i} on compressor stall margins.\n")

    pause = tmp_path / "paused"
    proc = ragpipe(["index", str(src), "--json"], database_url, home, pause_at=point, pause_file=pause)
    try:
        assert wait_for(lambda: pause.exists() or proc.poll() is not None, 300) and pause.exists(), proc.stderr.read()
        assert terminate(server_url, database_url) >= 1
        pause.unlink()  # carry on, on a connection the server has dropped
        rc, out, err = finished(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 75, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "database" in lines[0] and "retry" in lines[0], err

    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as registry:
        assert registry.list_aliases()[0].version == live  # readers kept the last good version
    rc, out, err = finished(ragpipe(["index", str(src), "--json"], database_url, home))
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["alias"]["previous"] == live
    rc, out, err = finished(ragpipe(["verify", "--json"], database_url, home))
    assert rc == 0, out
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as registry:
        texts = {r.text for r in registry.active_chunks("docs")}
    assert "Revised report 0 on compressor stall margins." in texts and len(texts) == 6


# -- secrets -------------------------------------------------------------------------------------


BAD_URLS = [
    "postgresql://u:s3cr%zzet@127.0.0.1/db",  # bad percent-encoding: libpq quotes the token
    "postgresql://u:s3cret@127.0.0.1:1/db",  # nothing listens there
    "postgresql://u:s3cret@127.0.0.1:1/db?sslmode=bogus",
    "host=127.0.0.1 port=1 user=u password=s3cret",
    "host=127.0.0.1 port=1 user=u password='s3 cret'",
    "host=127.0.0.1 port=bogus user=u password=s3cret",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_connection_errors_never_show_the_password(url):
    with pytest.raises(RegistryError) as failed:
        registry_db.connect(url)
    message = str(failed.value)
    assert "s3cr" not in message and "cret" not in message, message
    assert "\n" not in message and "registry database" in message


@pytest.mark.parametrize(("message", "url", "redacted"), [
    ('invalid percent-encoded token: "s3cr%zzet"', "postgresql://u:s3cr%zzet@h/db",
     'invalid percent-encoded token: "***"'),
    ("could not connect to postgresql://u:pa%40ss@h/db", None, "could not connect to postgresql://u:***@h/db"),
    ("password=secret host=h", None, "password=*** host=h"),
    ("password = 'a b\\' c' host=h", None, "password = *** host=h"),
    ("x pa@ss y", "postgresql://u:pa%40ss@h/db", "x *** y"),
    ("x hunter2 y", "host=h password=hunter2", "x *** y"),
])
def test_redact_removes_passwords_in_every_form(message, url, redacted):
    assert registry_db.redact(message, url) == redacted


@pytest.mark.slow
def test_cli_with_a_badly_encoded_password_names_the_url_problem_not_the_password(tmp_path):
    env = dict(os.environ, RAGPIPE_DATABASE_URL="postgresql://u:s3cr%zzet@127.0.0.1/db",
               RAGPIPE_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "alias", "list"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "s3cr" not in result.stderr and "zzet" not in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "database URL" in result.stderr


def test_schema_dump_passes_the_connection_through_the_environment(database_url, monkeypatch, capsys):
    from registry import schema_dump

    parts = conninfo.conninfo_to_dict(database_url)
    # trust authentication ignores the password, so a real pg_dump still runs with it
    url = conninfo.make_conninfo(database_url, password="s3cret-pw", application_name="dump")
    monkeypatch.setenv("RAGPIPE_DATABASE_URL", url)
    seen = []
    real_run = subprocess.run

    def spy(argv, **kwargs):  # records what the real pg_dump is given, then runs it
        seen.append((list(argv), dict(kwargs.get("env") or {})))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(schema_dump.subprocess, "run", spy)
    assert schema_dump.main() == 0
    assert "CREATE TABLE public.chunks" in capsys.readouterr().out
    (argv, env), = seen
    assert not any("s3cret" in a or "postgresql://" in a or "password" in a for a in argv), argv
    assert env["PGPASSWORD"] == "s3cret-pw"
    assert env["PGHOST"] == parts.get("host", env.get("PGHOST"))
    assert env["PGDATABASE"].startswith("ragpipe_scratch_")


def test_a_connection_dropped_while_idle_is_replaced_before_a_write(server_url, database_url, registry_config):
    with Registry.open(registry_config, migrate=False) as registry:
        registry.ping_after = 0.2
        assert terminate(server_url, database_url) == 1
        time.sleep(0.3)
        registry.store_embeddings("m", ["h1"], np.ones((1, 4), dtype=np.float32))  # on a new connection
        assert set(registry.fetch_embeddings("m", ["h1"])) == {"h1"}
        with registry.index_lock("docs", timeout_s=1):
            assert terminate(server_url, database_url) == 1
            time.sleep(0.3)
            with pytest.raises(registry_errors.ConnectionLost, match="index lock"):
                registry.store_embeddings("m", ["h2"], np.ones((1, 4), dtype=np.float32))
        assert registry.missing_embeddings("m", ["h1", "h2"]) == ["h2"]


class DroppingEmbedder:
    """The deterministic embedder, while the database drops every connection of the test's database
    during the first batch (the environment acting, as an idle kill would; the vectors are real)."""

    def __init__(self, inner, drop):
        self._inner, self._drop, self.drops = inner, drop, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def embed(self, texts):
        if self.drops == 0:
            self.drops = self._drop()
            time.sleep(1.2)  # longer than Registry.ping_after: the registry checks before its next write
        return self._inner.embed(texts)


def test_a_dag_embedding_task_carries_on_after_its_connection_is_dropped(
        tmp_path, server_url, database_url, registry_config, embedder):
    from pipeline import steps

    src = write_tree(tmp_path / "src", {f"d{i}.txt": f"Note {i} on vortex generators and flaps.\n" for i in range(6)})
    cfg = IndexConfig(index="docs", lock_timeout=2, batch_size=2)
    plain = lambda c: embedder  # noqa: E731
    planned = steps.plan(str(src), cfg, owner="airflow:test", embedder=plain, registry_config=registry_config)
    staged = steps.stage(planned["run_id"], cfg, embedder=plain, registry_config=registry_config)
    dropping = DroppingEmbedder(embedder, lambda: terminate(server_url, database_url))
    (batch,) = staged["batches"]
    result = steps.embed(planned["run_id"], batch, cfg, embedder=lambda c: dropping, registry_config=registry_config)
    assert dropping.drops == 1 and result["chunks_embedded"] == 6
    with Registry.open(registry_config, migrate=False) as registry:
        hashes = [r.chunk_hash for r in registry.member_rows("docs", registry.unfinished_versions("docs")[0].version_seq)]
        assert registry.missing_embeddings(embedder.model_id, hashes) == []


def test_raw_database_failures_become_one_line_transient_errors(server_url):
    import psycopg

    with registry_db.connect(server_url, autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError) as timeout:
            conn.execute("SET statement_timeout = 10")
            conn.execute("SELECT pg_sleep(1)")
    canceled = registry_db.connection_error(timeout.value)
    assert canceled.transient and "failed (canceling statement due to statement timeout); retry" in str(canceled)
    assert registry_db.connection_error(ValueError("x")) is None

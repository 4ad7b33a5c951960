"""Crash safety: SIGKILL a real `ragpipe index` process at named points, rerun, check nothing is lost or redone."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, write_tree
from registry import Registry, RegistryConfig

pytestmark = [pytest.mark.db, pytest.mark.slow]

TOPICS = ["wing", "nozzle", "shock", "boundary layer", "heat shield", "propeller", "rotor", "flap", "inlet", "vortex"]


def make_corpus(root, n=40):
    files = {}
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        files[f"doc{i:02d}.txt"] = f"Report {i}: measurements of the {topic} at Mach {i / 10:.1f} in tunnel {i % 7}.\n"
    return write_tree(root, files)


def ragpipe(args, database_url, home, kill_at=None):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_BATCH_SIZE="4",
               RAGPIPE_HOME=str(home))
    env.pop("RAGPIPE_TEST_KILL_AT", None)
    if kill_at:
        env["RAGPIPE_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def cached_hashes(url):
    with Registry.open(RegistryConfig(database_url=url), migrate=False) as reg:
        return dict(reg.conn.execute("SELECT chunk_hash, created_at FROM embeddings").fetchall())


def test_kill_while_embedding_then_rerun_embeds_nothing_twice(tmp_path, database_url):
    src = make_corpus(tmp_path / "src")
    killed = ragpipe(["index", str(src), "--json"], database_url, tmp_path / "home", kill_at="embed_batch_stored@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    survived = cached_hashes(database_url)
    assert len(survived) == 12  # three batches of four were committed before the kill
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        assert reg.active_chunk_ids("docs") == set()  # nothing was published
        assert reg.document_states("docs") == {}

    rerun = ragpipe(["index", str(src), "--json"], database_url, tmp_path / "home")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["embedding"]["chunks_cached"] == 12
    assert summary["embedding"]["chunks_embedded"] == 40 - 12
    after = cached_hashes(database_url)
    assert len(after) == 40
    assert all(after[h] == t for h, t in survived.items())  # the first run's vectors were kept, not redone
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        assert len(reg.active_chunk_ids("docs")) == 40
        runs = reg.conn.execute("SELECT status, error FROM runs ORDER BY run_id").fetchall()
    assert runs[0][0] == "failed" and runs[0][1].startswith("abandoned")  # the killed run, found by the rerun
    assert runs[1] == ("succeeded", None)


def verify_cli(database_url, home):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, RAGPIPE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", ["staged", "embed_batch_stored", "hnsw_written", "validated", "publishing"])
def test_kill_at_each_point_keeps_the_alias_and_converges(tmp_path, database_url, point):
    home = tmp_path / "home"
    src = make_corpus(tmp_path / "src", n=10)
    env_home = {"RAGPIPE_HOME": str(home)}

    def index(kill_at=None):
        env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_BATCH_SIZE="2",
                   **env_home)
        env.pop("RAGPIPE_TEST_KILL_AT", None)
        if kill_at:
            env["RAGPIPE_TEST_KILL_AT"] = kill_at
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(src), "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    good = index()
    assert good.returncode == 0, good.stderr
    live = json.loads(good.stdout)["version"]
    for i in range(4):  # four new texts: two embedding batches
        (src / f"doc{i:02d}.txt").write_text(f"Revised report {i} on compressor stall margins.\n")
    killed = index(kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        assert reg.list_aliases()[0].version == live  # readers still get the last good version
    check = verify_cli(database_url, home)
    assert check.returncode == 0, check.stdout
    embedded_before = set(cached_hashes(database_url))

    rerun = index()
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["alias"]["previous"] == live
    if point != "staged":  # the killed run embedded at least its first batch
        assert summary["embedding"]["chunks_cached"] >= 2
    assert set(cached_hashes(database_url)) - embedded_before == set() or point in ("staged", "embed_batch_stored")
    assert summary["embedding"]["chunks_embedded"] == 4 - summary["embedding"]["chunks_cached"]
    assert summary["recovered"] or point == "publishing"
    check = verify_cli(database_url, home)
    assert check.returncode == 0, check.stdout
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        texts = {r.text for r in reg.active_chunks("docs")}
    assert "Revised report 0 on compressor stall margins." in texts and len(texts) == 10

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


def ragpipe(args, database_url, kill_at=None):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_BATCH_SIZE="4")
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
    killed = ragpipe(["index", str(src), "--json"], database_url, kill_at="embed_batch_stored@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    survived = cached_hashes(database_url)
    assert len(survived) == 12  # three batches of four were committed before the kill
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        assert reg.active_chunk_ids("docs") == set()  # nothing was published
        assert reg.document_states("docs") == {}

    rerun = ragpipe(["index", str(src), "--json"], database_url)
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


def test_kill_before_apply_leaves_registry_untouched(tmp_path, database_url):
    src = make_corpus(tmp_path / "src", n=12)
    first = ragpipe(["index", str(src), "--json"], database_url)
    assert first.returncode == 0, first.stderr
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        before = reg.active_chunk_ids("docs")
    (src / "doc00.txt").write_text("A rewritten report about transonic buffet.\n")
    (src / "doc01.txt").unlink()
    killed = ragpipe(["index", str(src), "--json"], database_url, kill_at="before_apply")
    assert killed.returncode == -signal.SIGKILL
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        assert reg.active_chunk_ids("docs") == before
    rerun = ragpipe(["index", str(src), "--json"], database_url)
    summary = json.loads(rerun.stdout)
    assert summary["documents"]["changed"] == 1 and summary["documents"]["deleted"] == 1
    assert summary["embedding"]["chunks_embedded"] == 0  # the killed run had cached the new text

"""A full disk while writing a version: every write fails as an error the run records, never as a signal.

The artifact directory is a real tmpfs of a chosen size (``mount -t tmpfs``; root only): the
build's writes run out of space part-way through each file in turn, and a real `ragpipe index`
process runs out of space while writing its vector matrix.
"""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback

import numpy as np
import pytest

from conftest import REPO, write_tree
from pipeline.segments.build import chunk_table
from pipeline.segments.writer import SegmentParams, SegmentWriter
from registry import Registry, RegistryConfig
from registry.rows import ChunkRow, DocumentFields
from retrieval.segments.manifest import SegmentStore

PAGE = 4096


@pytest.fixture
def tmpfs():
    """Mount a tmpfs of ``size`` at a path (or resize one already there); all are unmounted after."""
    mounted = []

    def mount(path, size):
        if path in mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)
            return path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def synthetic_batch(n=600, dim=384):
    """``n`` chunks in four-chunk documents with random unit vectors, as a segment writer takes them."""
    rng = np.random.default_rng(7)
    words = ["wing", "nozzle", "shock", "boundary", "layer", "rotor", "flap", "inlet", "vortex", "stall"]
    rows = []
    for i in range(n):
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" report {i}"
        rows.append(ChunkRow(chunk_key=i + 1, chunk_id=f"chunk-{i}", doc_id=f"doc{i // 4}.txt",
                             chunk_hash=f"hash-{i}", ordinal=i % 4, heading_path=["Report"], char_start=0,
                             char_end=len(text), token_count=14, text=text, context="", page_start=None,
                             page_end=None, page_label_start=None, page_label_end=None))
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    doc_fields = {r.doc_id: DocumentFields(r.doc_id, f"file:///src/{r.doc_id}", {}, None) for r in rows}
    return chunk_table(rows, doc_fields), vectors


def write_segment(root, batch):
    table, vectors = batch
    store = SegmentStore(root)
    with SegmentWriter(store, SegmentParams(model_id="test-model", dim=vectors.shape[1]), expected_rows=len(vectors)) as w:
        for at in range(0, table.num_rows, 100):
            w.add(table.slice(at, 100), vectors[at:at + 100])
        return store.segment_path(w.finish(recall_target=0.9).name)


def _build_in_child(out, batch, report):
    outcome = {"error": None}
    try:
        write_segment(out, batch)
    except BaseException as exc:  # reported to the parent, which judges it
        outcome = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None),
                   "filename": getattr(exc, "filename", None), "message": str(exc)}
        traceback.print_exc()
    report.write_text(json.dumps(outcome))
    os._exit(0)


def build_in_child(out, batch, report):
    """Write a segment in a forked process (a SIGBUS there must not take the test run with it); its
    exit code and what it raised."""
    child = multiprocessing.get_context("fork").Process(target=_build_in_child, args=(out, batch, report))
    child.start()
    child.join(120)
    return child.exitcode, json.loads(report.read_text()) if report.exists() else None


def pages(nbytes):
    return -(-nbytes // PAGE)


@pytest.mark.parametrize("share", [0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
def test_running_out_of_space_while_writing_a_segment_raises_enospc(tmp_path, tmpfs, share):
    batch = synthetic_batch()
    reference = write_segment(tmp_path / "reference", batch)
    files = sorted(reference.iterdir())
    assert sum(1 for p in files if p.stat().st_size > 2 * PAGE) >= 3
    room = max(1, int(sum(pages(p.stat().st_size) for p in files) * share))
    out = tmpfs(tmp_path / "disk", f"{(room + 2) * PAGE // 1024}k")
    exit_code, outcome = build_in_child(out, batch, tmp_path / "outcome.json")
    assert exit_code != -signal.SIGBUS, f"SIGBUS at {share:.0%} of the room a segment needs"
    assert exit_code == 0 and outcome is not None, exit_code
    assert outcome["error"] is not None, f"the segment was written onto a full disk without an error ({share:.0%})"
    assert outcome["error"] == "WriteFailed" and outcome["errno"] == errno.ENOSPC, outcome
    assert outcome["filename"].startswith(str(out / "segments")), outcome  # the error names the file
    assert not [p for p in (out / "segments").iterdir()], "a partial segment was left behind"


TOPICS = ["wing", "nozzle", "shock", "boundary layer", "heat shield", "propeller", "rotor", "flap", "inlet", "vortex"]


def add_reports(root, start, count):
    write_tree(root, {f"doc{i:03d}.txt": f"Report {i}: measurements of the {TOPICS[i % len(TOPICS)]} at Mach "
                                         f"{i / 10:.1f} in tunnel {i % 7}.\n" for i in range(start, start + count)})
    return root


def cached_embeddings(url):
    with Registry.open(RegistryConfig(database_url=url), migrate=False) as reg:
        return dict(reg.conn.execute("SELECT chunk_hash, created_at FROM embeddings").fetchall())


@pytest.mark.db
@pytest.mark.slow
def test_full_disk_fails_the_run_with_exit_75_and_the_next_run_finishes(tmp_path, database_url, tmpfs):
    # room for the first version and the model's query encoder (stored once, ~90 MB); then 256 KiB
    artifacts = tmpfs(tmp_path / "artifacts", "160m")
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(tmp_path / "home"),
               RAGPIPE_ARTIFACTS=str(artifacts))
    env.pop("RAGPIPE_TEST_KILL_AT", None)

    def index():
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(src), "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    src = add_reports(tmp_path / "src", 0, 10)
    first = index()
    assert first.returncode == 0, first.stderr
    live = json.loads(first.stdout)["version"]
    usage = os.statvfs(artifacts)
    used_kib = (usage.f_blocks - usage.f_bfree) * usage.f_frsize // 1024
    tmpfs(artifacts, f"{used_kib + 256}k")

    add_reports(src, 10, 200)  # 210 vectors of 1.5 KB: more than the tmpfs has left
    full = index()
    assert full.returncode != -signal.SIGBUS, "the run was killed by SIGBUS"
    assert full.returncode == 75, (full.returncode, full.stderr)
    assert "disk full" in full.stderr and str(artifacts) in full.stderr, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        run = reg.list_runs("docs", 1)[0]
        assert run.status == "failed" and "disk full" in run.error, run
        assert reg.list_aliases()[0].version == live
        attempted = (run.counts or {}).get("version")
        statuses = {v.version: v.status for v in reg.list_versions("docs")}
    assert attempted and statuses[attempted] == "rejected", statuses  # not left 'building'
    assert sorted(p.name for p in (artifacts / "docs").iterdir()) == sorted([live, "segments"])
    live_segments = json.loads((artifacts / "docs" / live / "manifest.json").read_text())["segments"]
    # no partial files hold the space: only the live version's segments remain
    assert sorted(p.name for p in (artifacts / "docs" / "segments").iterdir()) == sorted(s["name"] for s in live_segments)
    embedded = cached_embeddings(database_url)
    assert len(embedded) == 210  # every text the failed run embedded is cached

    tmpfs(artifacts, "192m")  # space freed
    rerun = index()
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["embedding"]["chunks_embedded"] == 0 and summary["embedding"]["chunks_cached"] == 200
    assert summary["alias"]["previous"] == live and summary["chunks"]["active"] == 210
    assert cached_embeddings(database_url) == embedded  # nothing embedded twice
    check = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "--json"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

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
from pipeline.building import BuildPlan, build_version
from registry import Registry, RegistryConfig
from registry.rows import ChunkRow, DocumentFields
from retrieval.artifacts import CHUNKS_FILE, MANIFEST, MATRIX_FILE, VECTORS_FILE
from retrieval.bm25 import POSTINGS_FILE, VOCAB_FILE

PAGE = 4096
WRITE_ORDER = [CHUNKS_FILE, MATRIX_FILE, POSTINGS_FILE, VOCAB_FILE, VECTORS_FILE, MANIFEST]


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


def synthetic_plan(n=600, dim=384):
    """A full build of ``n`` chunks in four-chunk documents, with random unit vectors."""
    rng = np.random.default_rng(7)
    words = ["wing", "nozzle", "shock", "boundary", "layer", "rotor", "flap", "inlet", "vortex", "stall"]
    rows, vectors = [], {}
    for i in range(n):
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" report {i}"
        rows.append(ChunkRow(chunk_key=i + 1, chunk_id=f"chunk-{i}", doc_id=f"doc{i // 4}.txt",
                             chunk_hash=f"hash-{i}", ordinal=i % 4, heading_path=["Report"], char_start=0,
                             char_end=len(text), token_count=14, text=text, context="", page_start=None,
                             page_end=None, page_label_start=None, page_label_end=None))
        vector = rng.standard_normal(dim).astype(np.float32)
        vectors[f"hash-{i}"] = vector / np.linalg.norm(vector)
    doc_fields = {r.doc_id: DocumentFields(r.doc_id, f"file:///src/{r.doc_id}", {}, None) for r in rows}
    return BuildPlan(index="docs", version="docs_full", parent_version=None, parent_dir=None, run_id=1,
                     model_id="test-model", dim=dim, chunker_version="test", rows=rows, doc_fields=doc_fields,
                     vectors=vectors)


def _build_in_child(out, plan, report):
    outcome = {"error": None}
    try:
        build_version(out, plan)
    except BaseException as exc:  # reported to the parent, which judges it
        outcome = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None),
                   "filename": getattr(exc, "filename", None), "message": str(exc)}
        traceback.print_exc()
    report.write_text(json.dumps(outcome))
    os._exit(0)


def build_in_child(out, plan, report):
    """Build in a forked process (a SIGBUS there must not take the test run with it); its exit code
    and what it raised."""
    child = multiprocessing.get_context("fork").Process(target=_build_in_child, args=(out, plan, report))
    child.start()
    child.join(120)
    return child.exitcode, json.loads(report.read_text()) if report.exists() else None


def pages(nbytes):
    return -(-nbytes // PAGE)


@pytest.mark.parametrize("target", WRITE_ORDER)
def test_running_out_of_space_in_each_file_raises_enospc(tmp_path, tmpfs, target):
    plan = synthetic_plan()
    reference = tmp_path / "reference"
    reference.mkdir()
    build_version(reference, plan)
    sizes = {name: (reference / name).stat().st_size for name in WRITE_ORDER}
    assert sizes[MATRIX_FILE] > 2 * PAGE and sizes[VECTORS_FILE] > 2 * PAGE
    before = WRITE_ORDER[: WRITE_ORDER.index(target)]
    # room for every file written before the target and half of the target itself
    room = sum(pages(sizes[name]) for name in before) + pages(sizes[target]) // 2
    out = tmpfs(tmp_path / "disk", f"{room * PAGE // 1024}k")
    exit_code, outcome = build_in_child(out, plan, tmp_path / "outcome.json")
    assert exit_code != -signal.SIGBUS, f"SIGBUS while writing {target}"
    assert exit_code == 0 and outcome is not None, exit_code
    assert outcome["error"] is not None, f"the build wrote {target} onto a full disk without an error"
    assert outcome["error"] == "WriteFailed" and outcome["errno"] == errno.ENOSPC, outcome
    assert outcome["filename"] == str(out / target), outcome  # the error names the file it could not write


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
    assert sorted(p.name for p in (artifacts / "docs").iterdir()) == [live]  # no partial files hold the space
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

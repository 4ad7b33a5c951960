"""Crash safety of upserts, segment writes and merges: SIGKILL a real process at named points, then check
the alias stays on a complete version, verify is clean, the next attempt converges and embeds nothing twice."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.config import IndexConfig
from pipeline.deterministic import DeterministicEmbedder
from pipeline.runner import artifact_store, run_index
from pipeline.upsert import delete_documents, upsert_documents
from pipeline.verify import verify_index
from registry import Registry
from version_files import chunk_rows, files_of

pytestmark = pytest.mark.db

CONFIG = IndexConfig(lock_timeout=5, batch_size=2)

# a process that upserts FILE with the deterministic embedder (what `ragpipe upsert` does with a model)
UPSERT = """
import sys
from pipeline.config import IndexConfig
from pipeline.deterministic import DeterministicEmbedder
from pipeline.upsert import delete_documents, upsert_documents
from registry import Registry, RegistryConfig
with Registry.open(RegistryConfig.from_env(), migrate=False) as registry:
    outcome = upsert_documents(sys.argv[1], registry, DeterministicEmbedder(), IndexConfig(lock_timeout=5, batch_size=2))
print(outcome.summary.version)
"""

# a process that rebuilds the index in full from SOURCE, writing segments of at most 8 chunks
REBUILD = """
import sys
from pipeline.config import IndexConfig
from pipeline.deterministic import DeterministicEmbedder
from pipeline.runner import RunOptions, run_index
from registry import Registry, RegistryConfig
with Registry.open(RegistryConfig.from_env(), migrate=False) as registry:
    summary = run_index(sys.argv[1], registry, DeterministicEmbedder(),
                        IndexConfig(lock_timeout=5, batch_size=2, segment_rows=8), options=RunOptions(full=True))
print(summary.version)
"""


def process(args, registry_config, kill_at=None):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, HF_HUB_OFFLINE="1",
               RAGPIPE_HOME=str(registry_config.home))
    env.pop("RAGPIPE_TEST_KILL_AT", None)
    if kill_at:
        env["RAGPIPE_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def cached(registry):
    return dict(registry.conn.execute("SELECT chunk_hash, created_at FROM embeddings").fetchall())


def base_index(tmp_path, registry, n=30):
    src = tmp_path / "base.jsonl"
    src.write_text("".join(json.dumps({"doc_id": f"r{i:02d}", "text": f"Report {i}: the rotor at Mach {i / 10:.1f}."})
                           + "\n" for i in range(n)))
    return run_index(str(src), registry, DeterministicEmbedder(), CONFIG).version


def clean(registry):
    return verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs")


def write_batch(path, doc_ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"doc_id": d, "text": f"Page {d} on airship gas cells."}) + "\n"
                            for d in doc_ids))
    return path


def listed_segments(registry):
    files = files_of(registry, CONFIG)
    return {ref.name for v in registry.list_versions("docs") if v.status not in ("removed", "rejected")
            for m in [files.read_version(v.version)] if m for ref in m.segments}


def kill_then_rerun(script, path, registry, registry_config, live, point):
    """Run ``script`` on ``path`` killed at ``point``: the alias stays on ``live`` and verify is clean;
    then run it again to the end. Returns the rerun's version and the embedding cache between the two."""
    killed = process(["-c", script, str(path)], registry_config, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert registry.list_aliases()[0].version == live  # readers still get the last complete version
    report = clean(registry)
    assert report.ok, report.violations
    before = cached(registry)
    rerun = process(["-c", script, str(path)], registry_config)
    assert rerun.returncode == 0, rerun.stderr
    version = rerun.stdout.strip().splitlines()[-1]
    assert registry.list_aliases()[0].version == version != live
    return version, before


@pytest.mark.parametrize("point", ["staged", "embed_batch_stored@2", "segment_written", "hnsw_written", "validated",
                                   "publishing"])
def test_a_killed_upsert_leaves_the_alias_and_the_next_one_converges(tmp_path, registry, registry_config, point):
    live = base_index(tmp_path, registry)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"doc_id": f"fresh/{i}", "text": f"Fresh page {i} on airship gas cells."})
                             + "\n" for i in range(5)))
    version, before = kill_then_rerun(UPSERT, batch, registry, registry_config, live, point)
    after = cached(registry)
    assert all(after[h] == t for h, t in before.items())  # what the killed process embedded was kept
    assert len(after) == 30 + 5  # and every text is embedded exactly once
    assert {r["doc_id"] for r in chunk_rows(registry, CONFIG, version)} >= {f"fresh/{i}" for i in range(5)}
    report = clean(registry)
    assert report.ok, report.violations
    # what the killed process wrote and no version lists (a segment, a deletion set) went with the rerun's gc
    assert files_of(registry, CONFIG).stored_segments() == listed_segments(registry)


@pytest.mark.parametrize("point", ["segment_written", "segment_written@3", "hnsw_written"])
def test_a_killed_full_rebuild_into_several_segments_leaves_the_alias_and_the_next_one_converges(
        tmp_path, registry, registry_config, point):
    live = base_index(tmp_path, registry)
    src = tmp_path / "base.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for row in rows[:4]:
        row["text"] += " Revised after the second tunnel entry."
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    version, before = kill_then_rerun(REBUILD, src, registry, registry_config, live, point)
    manifest = files_of(registry, CONFIG).read_version(version)
    assert len(manifest.segments) == 4 and manifest.chunks == 30  # 8 + 8 + 8 + 6
    after = cached(registry)
    assert all(after[h] == t for h, t in before.items()) and len(after) == 30 + 4  # each text embedded once
    assert sum("Revised after" in r["text"] for r in chunk_rows(registry, CONFIG, version)) == 4
    report = clean(registry)
    assert report.ok, report.violations
    assert files_of(registry, CONFIG).stored_segments() == listed_segments(registry)


@pytest.fixture
def fragmented(tmp_path, registry):
    """30 reports, 8 of them deleted (over the 20% a segment may hold: its rewrite is one merge), then
    six one-document upserts (six small segments: merged among themselves, a second merge)."""
    base_index(tmp_path, registry)
    delete_documents([f"r{i:02d}" for i in range(8)], registry, DeterministicEmbedder(), CONFIG)
    for i in range(6):
        upsert_documents(io.BytesIO((json.dumps({"doc_id": f"u{i}", "text": f"Upserted page {i} on ailerons."})
                                     + "\n").encode()), registry, DeterministicEmbedder(), CONFIG)
    return registry.list_aliases()[0].version


@pytest.mark.parametrize("point", ["merge_written", "merge_written@2", "merge_validated", "publishing"])
def test_a_killed_compact_leaves_the_alias_and_the_next_one_converges(fragmented, registry, registry_config, point):
    live = fragmented
    chunks = chunk_rows(registry, CONFIG, live)
    before = cached(registry)
    killed = process(["-m", "pipeline.cli", "compact"], registry_config, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert registry.list_aliases()[0].version == live
    report = clean(registry)
    assert report.ok, report.violations

    again = process(["-m", "pipeline.cli", "compact", "--json"], registry_config)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["status"] == "published" and result["segments_after"] < result["segments_before"] == 7
    assert sorted(m["reason"] for m in result["merges"]) == ["deletes", "tiers"]
    assert registry.list_aliases()[0].version == result["version"]
    assert chunk_rows(registry, CONFIG, result["version"]) == chunks  # no chunk set changed
    assert cached(registry) == before  # merges embed nothing: they copy the stored vectors
    with Registry.open(registry_config, migrate=False) as fresh:
        report = clean(fresh)
    assert report.ok, report.violations
    assert files_of(registry, CONFIG).stored_segments() == listed_segments(registry)
    # and the next upsert builds on the merged version
    rerun = process(["-c", UPSERT, str(write_batch(registry_config.home / "next.jsonl", ["next/0"]))], registry_config)
    assert rerun.returncode == 0, rerun.stderr
    version = rerun.stdout.strip().splitlines()[-1]
    assert registry.get_version(version).parent_version == result["version"]
    assert len(cached(registry)) == len(before) + 1
    report = clean(registry)
    assert report.ok, report.violations


def test_a_compact_process_that_lost_the_race_to_an_upsert_is_discarded(fragmented, registry, registry_config,
                                                                        tmp_path):
    """`ragpipe compact` paused after its first merge while an upsert publishes: it discards its merge
    (exit 75), the upsert's version stays live, and nothing it wrote stays behind."""
    import time

    marker = tmp_path / "paused"
    env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, HF_HUB_OFFLINE="1",
               RAGPIPE_HOME=str(registry_config.home), RAGPIPE_TEST_PAUSE_AT="merge_written",
               RAGPIPE_TEST_PAUSE_FILE=str(marker))
    env.pop("RAGPIPE_TEST_KILL_AT", None)
    compact = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "compact", "--json"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and compact.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), compact.communicate()[1]
        racer = upsert_documents(io.BytesIO(b'{"doc_id": "racer", "text": "Published while the merge ran."}\n'),
                                 registry, DeterministicEmbedder(), CONFIG).summary
        marker.unlink()
        out, err = compact.communicate(timeout=120)
    finally:
        if compact.poll() is None:
            compact.kill()
            compact.wait()
    assert compact.returncode == 75, err
    result = json.loads(out)
    assert result["status"] == "discarded" and result["version"] is None and "was published while merging" in \
        result["reason"]
    assert registry.list_aliases()[0].version == racer.version == registry.head_version("docs").version
    assert "racer" in {r["doc_id"] for r in chunk_rows(registry, CONFIG, racer.version)}
    assert files_of(registry, CONFIG).stored_segments() == listed_segments(registry)
    assert registry.get_version(racer.version).parent_version == fragmented
    report = clean(registry)
    assert report.ok, report.violations

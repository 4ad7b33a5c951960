"""Crash safety of upserts, segment writes and merges: SIGKILL a real process at named points, then check
the alias stays on a complete version, verify is clean, the next attempt converges and embeds nothing twice."""

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
from pipeline.upsert import upsert_documents
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
from pipeline.upsert import upsert_documents
from registry import Registry, RegistryConfig
with Registry.open(RegistryConfig.from_env(), migrate=False) as registry:
    outcome = upsert_documents(sys.argv[1], registry, DeterministicEmbedder(), IndexConfig(lock_timeout=5, batch_size=2))
print(outcome.summary.version)
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


@pytest.mark.parametrize("point", ["staged", "embed_batch_stored@2", "segment_written", "hnsw_written", "validated",
                                   "publishing"])
def test_a_killed_upsert_leaves_the_alias_and_the_next_one_converges(tmp_path, registry, registry_config, point):
    live = base_index(tmp_path, registry)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"doc_id": f"fresh/{i}", "text": f"Fresh page {i} on airship gas cells."})
                             + "\n" for i in range(5)))
    killed = process(["-c", UPSERT, str(batch)], registry_config, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert registry.list_aliases()[0].version == live  # readers still get the last complete version
    report = clean(registry)
    assert report.ok, report.violations
    before = cached(registry)

    rerun = process(["-c", UPSERT, str(batch)], registry_config)
    assert rerun.returncode == 0, rerun.stderr
    version = rerun.stdout.strip().splitlines()[-1]
    assert registry.list_aliases()[0].version == version != live
    after = cached(registry)
    assert all(after[h] == t for h, t in before.items())  # what the killed process embedded was kept
    assert len(after) == 30 + 5  # and every text is embedded exactly once
    assert {r["doc_id"] for r in chunk_rows(registry, CONFIG, version)} >= {f"fresh/{i}" for i in range(5)}
    report = clean(registry)
    assert report.ok, report.violations
    # what the killed process wrote and no version lists (a segment, a deletion set) went with the rerun's gc
    files = files_of(registry, CONFIG)
    listed = {ref.name for v in registry.list_versions("docs") if v.status not in ("removed", "rejected")
              for m in [files.read_version(v.version)] if m for ref in m.segments}
    assert files.stored_segments() == listed


@pytest.mark.parametrize("point", ["merge_written", "merge_validated", "publishing"])
def test_a_killed_compact_leaves_the_alias_and_the_next_one_converges(tmp_path, registry, registry_config, point):
    import io

    base_index(tmp_path, registry)
    for i in range(6):  # six small segments: the policy merges them
        upsert_documents(io.BytesIO((json.dumps({"doc_id": f"u{i}", "text": f"Upserted page {i} on ailerons."})
                                     + "\n").encode()), registry, DeterministicEmbedder(), CONFIG)
    live = registry.list_aliases()[0].version
    chunks = chunk_rows(registry, CONFIG, live)
    killed = process(["-m", "pipeline.cli", "compact"], registry_config, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert registry.list_aliases()[0].version == live
    report = clean(registry)
    assert report.ok, report.violations

    again = process(["-m", "pipeline.cli", "compact", "--json"], registry_config)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["status"] == "published" and result["segments_after"] < result["segments_before"]
    assert registry.list_aliases()[0].version == result["version"]
    assert chunk_rows(registry, CONFIG, result["version"]) == chunks  # no chunk set changed
    with Registry.open(registry_config, migrate=False) as fresh:
        report = clean(fresh)
    assert report.ok, report.violations

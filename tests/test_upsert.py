"""Upserts and deletes without a snapshot, on a real PostgreSQL: one small segment per batch, bad items
reported with the good ones published, the lock shared with snapshot runs, and how the two combine."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store, run_index
from pipeline.upsert import delete_documents, upsert_documents
from pipeline.verify import verify_index
from registry import IndexLocked, Registry
from retrieval import Retriever
from version_files import chunk_rows, manifest_of

pytestmark = pytest.mark.db

CONFIG = IndexConfig(lock_timeout=5, max_document_bytes=2000)


def snapshot(tmp_path, count=30):
    path = tmp_path / "snapshot.jsonl"
    path.write_text("".join(json.dumps({"doc_id": f"r{i:02d}", "text": f"Report {i} on the wing at Mach {i / 10:.1f}.",
                                        "metadata": {"title": f"Report {i}"}}) + "\n" for i in range(count)))
    return path


def batch(*lines):
    return io.BytesIO("".join(line + "\n" for line in lines).encode())


def line(doc_id, text, **metadata):
    return json.dumps({"doc_id": doc_id, "text": text, "metadata": metadata})


def docs_of(registry, version):
    return {r["doc_id"] for r in chunk_rows(registry, CONFIG, version)}


def test_an_upsert_adds_one_segment_reports_bad_items_and_publishes_the_good(tmp_path, registry, embedder):
    base = run_index(str(snapshot(tmp_path)), registry, embedder, CONFIG)
    outcome = upsert_documents(batch(
        line("fresh/zeppelin", "Rigid airships carried hydrogen cells; the quokka flew as a mascot."),
        "{not json",
        line("fresh/zeppelin", "A second line for the same document."),
        line("fresh/big", "x" * 5000),
        json.dumps({"doc_id": "fresh/notext"}),
        line("r03", "Report 3, revised: the wing at Mach 0.3 stalls early."),
    ), registry, embedder, CONFIG)
    summary = outcome.summary
    assert summary.status == "succeeded" and summary.alias["previous"] == base.version
    reasons = {r["doc_id"]: r["reason"] for r in outcome.rejected}
    assert reasons["stdin:2"].startswith("line 2: malformed JSON")
    assert reasons["fresh/zeppelin"] == "line 3: duplicate doc_id (first at line 1)"
    assert reasons["stdin:4"] == "line 4: record larger than the 2000-byte limit"
    assert reasons["stdin:5"] == "line 5: doc_id 'fresh/notext': missing or non-string text"
    assert summary.documents["new"] == 1 and summary.documents["changed"] == 1 and summary.documents["deleted"] == 0
    assert summary.embedding["chunks_embedded"] == 2
    assert docs_of(registry, summary.version) == docs_of(registry, base.version) | {"fresh/zeppelin"}
    before, after = manifest_of(registry, CONFIG, base.version), manifest_of(registry, CONFIG, summary.version)
    assert set(before.segment_names) <= set(after.segment_names) and len(after.segments) == len(before.segments) + 1
    assert after.segments[0].deleted == 1  # r03's old chunk
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok


def test_delete_removes_named_documents_and_reports_unknown_ones(tmp_path, registry, embedder):
    run_index(str(snapshot(tmp_path, 5)), registry, embedder, CONFIG)
    outcome = delete_documents(["r01", "nope", "r01", "r04"], registry, embedder, CONFIG)
    assert outcome.summary.documents["deleted"] == 2
    assert {(r["doc_id"], r["reason"]) for r in outcome.rejected} == {
        ("nope", "not a document of index 'docs'; nothing to delete"), ("r01", "listed twice for deletion")}
    assert docs_of(registry, outcome.summary.version) == {"r00", "r02", "r03"}
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok
    # the last documents may be deleted by name (a snapshot that lists nothing may not)
    last = delete_documents(["r00", "r02", "r03"], registry, embedder, CONFIG)
    assert docs_of(registry, last.summary.version) == set() and not last.rejected


def test_a_snapshot_run_after_upserts_is_the_truth_and_embeds_nothing_again(tmp_path, registry, embedder):
    path = snapshot(tmp_path, 10)
    run_index(str(path), registry, embedder, CONFIG)
    text = "Report 99 on the wing at Mach 9.9."
    upserted = upsert_documents(batch(line("r99", text, title="Report 99")), registry, embedder, CONFIG).summary
    assert upserted.embedding["chunks_embedded"] == 1
    # the next snapshot lists r99 unchanged (its text) and no longer lists r00: r00 goes, r99 is not re-embedded
    rows = [json.loads(x) for x in path.read_text().splitlines()][1:]
    rows.append({"doc_id": "r99", "text": text, "metadata": {"title": "Report 99"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = run_index(str(path), registry, embedder, CONFIG)
    assert after.documents["deleted"] == 1 and after.embedding["chunks_embedded"] == 0
    assert docs_of(registry, after.version) == {f"r{i:02d}" for i in range(1, 10)} | {"r99"}
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok


def test_an_upsert_waits_for_the_lock_of_a_running_snapshot_or_gives_up(tmp_path, registry, registry_config,
                                                                         embedder):
    run_index(str(snapshot(tmp_path, 3)), registry, embedder, CONFIG)
    new = tmp_path / "new.jsonl"
    new.write_text(line("fresh/a", "A fresh page on airships.") + "\n")
    with Registry.open(registry_config, migrate=False) as other, other.index_lock("docs", 5):
        with pytest.raises(IndexLocked):
            upsert_documents(new, registry, embedder, IndexConfig(lock_timeout=0.5))
        env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, HF_HUB_OFFLINE="1",
                   RAGPIPE_HOME=str(registry_config.home), RAGPIPE_MODEL="deterministic")
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "upsert", str(new), "--lock-timeout", "0.5"],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 75, result.stderr
    waited = upsert_documents(new, registry, embedder, CONFIG)  # the lock is free again
    assert waited.summary.status == "succeeded" and "fresh/a" in docs_of(registry, waited.summary.version)


def test_a_following_retriever_serves_an_upserted_document_within_seconds(tmp_path, registry, registry_config,
                                                                          embedder):
    run_index(str(snapshot(tmp_path, 20)), registry, embedder, CONFIG)
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        poll_interval=0.5) as r:
        loaded_before = r.segments.loaded
        started = time.monotonic()
        upsert_documents(batch(line("fresh/quokka", "The quokka flew aboard the zeppelin as a mascot.")),
                         registry, embedder, CONFIG)
        while time.monotonic() - started < 10 and "fresh/quokka" not in [h.doc_id for h in r.search("quokka", k=1)]:
            time.sleep(0.05)
        assert r.search("quokka mascot", k=1)[0].doc_id == "fresh/quokka"
        assert time.monotonic() - started < 10
        # the new version shares the old one's segments: only the upsert's segment was opened
        assert set(loaded_before) <= set(r.segments.loaded) and len(r.segments.loaded) == len(loaded_before) + 1


def cli(args, registry_config, stdin=None, **env_extra):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, HF_HUB_OFFLINE="1",
               RAGPIPE_HOME=str(registry_config.home), **env_extra)
    env.pop("RAGPIPE_TEST_PAUSE_AT", None)
    env.pop("RAGPIPE_MODEL", None)  # the default model, as `ragpipe` runs it
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, input=stdin,
                          capture_output=True, timeout=180)


def test_bad_items_of_a_stdin_batch_are_reported_each_and_leave_their_documents_as_they_were(
        tmp_path, registry, registry_config):
    indexed = cli(["index", str(snapshot(tmp_path, 8)), "--json"], registry_config)
    assert indexed.returncode == 0, indexed.stderr
    base = registry.head_version("docs")
    before = {r["doc_id"]: r["text"] for r in chunk_rows(registry, CONFIG, base.version)}
    lines = [
        line("fresh/ok", "A fresh page on the airship's gas cells."),
        json.dumps({"doc_id": "r01", "text": 5}),  # an indexed document, with a bad replacement
        line("r02", "y" * 2500),  # over the 2000-byte limit
        json.dumps({"doc_id": "r04", "text": "Report 4, revised.", "metadata": [1]}),
        json.dumps({"doc_id": "r05", "text": "Report 5, revised.", "metadata": {"valid_from": "soon"}}),
        json.dumps({"doc_id": "", "text": "No name."}),
        "[1, 2]",
        line("r06", "Report 6, revised: the wing at Mach 0.6 buffets."),
        line("fresh/ok", "The same doc_id again."),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"doc_id": "fresh/bytes", "text": "\xff\xfe"}\n'
    result = cli(["upsert", "-", "--json", "--max-document-bytes", "2000"], registry_config, stdin=data)
    assert result.returncode == 1 and result.stdout, result.stderr  # something was rejected: the caller must look
    out = json.loads(result.stdout)
    assert out["status"] == "succeeded" and out["documents"]["new"] == 1 and out["documents"]["changed"] == 1
    reasons = {r["doc_id"]: r["reason"] for r in out["rejected"]}
    assert reasons == {
        "stdin:2": "line 2: doc_id 'r01': missing or non-string text",
        "stdin:3": "line 3: doc_id 'r02': text larger than the 2000-byte limit",
        "stdin:4": "line 4: doc_id 'r04': metadata is not an object",
        "r05": "line 5: metadata.valid_from 'soon' is not an ISO 8601 timestamp",
        "stdin:6": "line 6: missing or non-string doc_id",
        "stdin:7": "line 7: not a JSON object",
        "fresh/ok": "line 9: duplicate doc_id (first at line 1)",
        "stdin:10": reasons.get("stdin:10", "?"),
    }
    assert reasons["stdin:10"].startswith("line 10: malformed JSON")
    stderr = result.stderr.decode()
    for doc_id, reason in reasons.items():  # each on standard error too, by name, with its reason
        assert f"ragpipe: rejected {doc_id}: {reason}" in stderr
    after = {r["doc_id"]: r["text"] for r in chunk_rows(registry, CONFIG, out["version"])}
    assert set(after) == set(before) | {"fresh/ok"}  # nothing lost: the bad replacements left their documents
    assert {d: after[d] for d in ("r01", "r02", "r04", "r05")} == {d: before[d] for d in ("r01", "r02", "r04", "r05")}
    assert after["r06"].startswith("Report 6, revised") and after["fresh/ok"].startswith("A fresh page")
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok


def test_a_batch_of_only_bad_lines_publishes_nothing(tmp_path, registry, registry_config):
    indexed = cli(["index", str(snapshot(tmp_path, 3)), "--json"], registry_config)
    assert indexed.returncode == 0, indexed.stderr
    base = registry.head_version("docs")
    result = cli(["upsert", "-", "--json"], registry_config, stdin=b"{oops\n" + json.dumps({"doc_id": "x"}).encode())
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["version"] is None and [r["doc_id"] for r in out["rejected"]] == ["stdin:1", "stdin:2"]
    assert registry.list_aliases()[0].version == base.version and len(registry.list_versions("docs")) == 1


SNAPSHOT = """
import sys
from pipeline.config import IndexConfig
from pipeline.deterministic import DeterministicEmbedder
from pipeline.runner import run_index
from registry import Registry, RegistryConfig
with Registry.open(RegistryConfig.from_env(), migrate=False) as registry:
    print(run_index(sys.argv[1], registry, DeterministicEmbedder(), IndexConfig(lock_timeout=5)).version)
"""


def test_an_upsert_racing_a_snapshot_run_waits_for_it_or_exits_75(tmp_path, registry, registry_config, embedder):
    """A real snapshot run, paused while it holds the lock (its chunks staged): an upsert with a short
    lock timeout exits 75 and changes nothing; one that waits publishes after the snapshot, on top of it."""
    import threading

    path = snapshot(tmp_path, 6)
    run_index(str(path), registry, embedder, CONFIG)
    with path.open("a") as f:
        f.write(line("r50", "Report 50 on the nacelle at Mach 0.8.") + "\n")
    marker = tmp_path / "paused"
    env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, HF_HUB_OFFLINE="1",
               RAGPIPE_HOME=str(registry_config.home), RAGPIPE_TEST_PAUSE_AT="staged",
               RAGPIPE_TEST_PAUSE_FILE=str(marker))
    run = subprocess.Popen([sys.executable, "-c", SNAPSHOT, str(path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    waited: list = []
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), run.communicate()[1]
        batch_file = tmp_path / "new.jsonl"
        batch_file.write_text(line("fresh/racer", "A page upserted while the snapshot ran.") + "\n")
        gave_up = cli(["upsert", str(batch_file), "--lock-timeout", "0.5"], registry_config)
        assert gave_up.returncode == 75, gave_up.stderr
        assert b"is being updated by another process" in gave_up.stderr

        def wait_and_upsert():
            with Registry.open(registry_config, migrate=False) as other:
                waited.append(upsert_documents(batch_file, other, embedder, IndexConfig(lock_timeout=60)).summary)

        thread = threading.Thread(target=wait_and_upsert)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not waited  # waiting for the lock
        marker.unlink()
        out, err = run.communicate(timeout=120)
        thread.join(timeout=120)
    finally:
        marker.unlink(missing_ok=True)
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err
    snapshot_version = out.strip().splitlines()[-1]
    assert waited and waited[0].status == "succeeded"
    assert registry.get_version(waited[0].version).parent_version == snapshot_version
    assert registry.list_aliases()[0].version == waited[0].version
    assert docs_of(registry, waited[0].version) == {f"r{i:02d}" for i in range(6)} | {"r50", "fresh/racer"}
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok

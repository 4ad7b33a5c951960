"""One incremental pass after another on a real PostgreSQL: the plan, the counts and the invariants."""

import os

import pytest

from conftest import write_tree
from pipeline.chunking import chunk_document
from pipeline.config import IndexConfig
from pipeline.errors import SourceUnavailable, UnsafeDeletion
from pipeline.runner import run_index
from pipeline.sources import scan_source

pytestmark = pytest.mark.db

GUIDE = """# Guide

Ragpipe keeps a retrieval index in step with its sources.

## Install

Create the environment, then install the package and its model.

## Usage

Run the indexer on a schedule. It embeds only chunks it has never seen.
"""

NOTES = """Notes
=====

Plain reStructuredText notes about wings and drag.

Details
-------

The boundary layer thickens downstream of the leading edge.
"""


def corpus(root):
    return write_tree(root, {"guide.md": GUIDE, "notes/notes.rst": NOTES, "code/mod.py": "def f():\n    return 1\n"})


def fresh_chunk_ids(root, embedder, config):
    """Chunk ids a full build of the source's current state would hold."""
    scan = scan_source(root, include=config.include, exclude=config.exclude)
    counter = embedder.token_counter()
    return {c.chunk_id for d in scan.documents for c in chunk_document(d, counter, embedder.max_tokens)}


def index(root, registry, embedder, name="docs", **kw):
    config = IndexConfig(index=name, lock_timeout=5, **kw)
    return run_index(str(root), registry, embedder, config), config


def test_first_run_then_noop(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    first, config = index(root, registry, embedder)
    assert first.status == "succeeded" and first.version.startswith("docs_")
    assert first.documents == {"seen": 3, "new": 3, "changed": 0, "metadata_only": 0, "unchanged": 0,
                               "deleted": 0, "skipped": 0, "kept_on_error": 0}
    assert first.chunks["added"] == first.chunks["active"] > 0
    assert first.embedding["chunks_embedded"] + first.embedding["chunks_cached"] == first.chunks["added"]
    assert registry.active_chunk_ids("docs") == fresh_chunk_ids(root, embedder, config)

    again, _ = index(root, registry, embedder)
    assert again.version is None
    assert again.documents["unchanged"] == 3
    assert again.embedding["chunks_embedded"] == 0 and "chunk" not in again.stage_seconds
    assert again.chunks == {"added": 0, "removed": 0, "kept": 0, "active": first.chunks["active"]}
    run = registry.get_run(again.run_id)
    assert run.status == "succeeded" and run.counts["documents"]["unchanged"] == 3


def test_edit_delete_add_equal_a_fresh_build(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    index(root, registry, embedder)
    # edit one section of the guide, delete the notes, add a new file
    (root / "guide.md").write_text(GUIDE.replace("on a schedule", "every hour"))
    (root / "notes" / "notes.rst").unlink()
    (root / "new.txt").write_text("A brand new document about lift.\n")
    summary, config = index(root, registry, embedder)
    assert summary.documents["changed"] == 1 and summary.documents["deleted"] == 1
    assert summary.documents["new"] == 1 and summary.documents["unchanged"] == 1
    assert registry.active_chunk_ids("docs") == fresh_chunk_ids(root, embedder, config)
    assert registry.active_chunks_of_deleted_documents("docs") == 0
    # the unchanged sections of the guide were served from the cache
    assert summary.embedding["chunks_embedded"] <= 2
    # attribution: every active chunk's text is exactly its span of the current document
    for row in registry.active_chunks("docs"):
        text = (root / row.doc_id).read_text()
        assert text[row.char_start : row.char_end] == row.text


def test_identical_text_in_two_documents_is_embedded_once(tmp_path, registry, embedder):
    body = "Shared paragraph about supersonic inlets and shock waves.\n"
    root = write_tree(tmp_path / "src", {"a.txt": body, "b.txt": body})
    summary, _ = index(root, registry, embedder)
    assert summary.chunks["added"] == 2
    assert summary.embedding == {"chunks_embedded": 1, "chunks_cached": 0, "chars_embedded": len(body.strip())}


def test_moving_text_costs_no_embedding(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {"a.md": "# A\n\nFirst part.\n\n# B\n\nSecond part.\n"})
    index(root, registry, embedder, name="m")
    (root / "a.md").write_text("# Preface\n\nNew text.\n\n" + (root / "a.md").read_text())
    summary, _ = index(root, registry, embedder, name="m")
    assert summary.embedding["chunks_embedded"] <= 1  # only the new preface text


def test_metadata_only_change_touches_no_chunk(tmp_path, registry, embedder):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"doc_id": "d1", "text": "Some text here.", "metadata": {"lang": "en"}}\n')
    first, _ = index(src, registry, embedder, name="j")
    src.write_text('{"doc_id": "d1", "text": "Some text here.", "metadata": {"lang": "de"}}\n')
    second, _ = index(src, registry, embedder, name="j")
    assert second.documents["metadata_only"] == 1
    assert second.chunks["added"] == 0 and second.chunks["removed"] == 0
    row = registry.conn.execute("SELECT metadata, chunk_count FROM documents WHERE index_name='j'").fetchone()
    assert row == ({"lang": "de"}, 1)


def test_bad_input_is_skipped_with_reasons_and_loses_nothing(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the root")
    write_tree(root, {"bin.txt": b"\x00\x01binary", "latin.txt": b"caf\xe9", "empty.md": "  \n\n", "big.txt": "x" * 2048})
    os.symlink(outside, root / "escape.txt")
    os.symlink(root / "guide.md", root / "inside-link.md")
    summary, _ = index(root, registry, embedder, max_document_bytes=1024)
    reasons = {s["doc_id"]: s["reason"] for s in summary.skipped}
    assert reasons["bin.txt"].startswith("binary file")
    assert reasons["latin.txt"].startswith("not valid UTF-8")
    assert reasons["empty.md"] == "empty document"
    assert reasons["big.txt"].startswith("larger than the 1024-byte limit")
    assert reasons["escape.txt"] == "symlink leaves the source root"
    assert summary.documents["seen"] == 4 and summary.documents["skipped"] == 5  # inside-link.md is indexed
    assert registry.get_run(summary.run_id).skipped == summary.skipped


def test_malformed_jsonl_lines_are_reported_with_line_numbers(tmp_path, registry, embedder):
    src = tmp_path / "docs.jsonl"
    src.write_text(
        '{"doc_id": "ok", "text": "fine"}\n'
        "{not json\n"
        '{"doc_id": "no-text"}\n'
        '{"doc_id": "ok", "text": "again"}\n'
        '["a list"]\n'
    )
    summary, _ = index(src, registry, embedder, name="j")
    reasons = [s["reason"] for s in summary.skipped]
    assert reasons[0].startswith("line 2: malformed JSON")
    assert reasons[1] == "line 3: doc_id 'no-text': missing or non-string text"
    assert reasons[2] == "line 4: duplicate doc_id (first at line 1)"
    assert reasons[3] == "line 5: not a JSON object"
    assert summary.documents["seen"] == 1


def test_unreadable_source_fails_before_anything_changes(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    first, config = index(root, registry, embedder)
    before = registry.active_chunk_ids("docs")
    with pytest.raises(SourceUnavailable, match="does not exist"):
        index(tmp_path / "missing", registry, embedder)
    assert registry.active_chunk_ids("docs") == before
    failed = registry.conn.execute("SELECT status, error FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    assert failed[0] == "failed" and "SourceUnavailable" in failed[1]


def test_empty_source_refuses_to_wipe_the_index(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    index(root, registry, embedder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsafeDeletion, match="refusing to delete all 3 documents"):
        index(empty, registry, embedder)
    assert len(registry.active_chunk_ids("docs")) > 0
    summary, _ = index(empty, registry, embedder, allow_delete_all=True)
    assert summary.documents["deleted"] == 3 and registry.active_chunk_ids("docs") == set()


def test_deleted_document_that_returns_is_new_again(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    index(root, registry, embedder)
    saved = (root / "guide.md").read_text()
    (root / "guide.md").unlink()
    index(root, registry, embedder)
    (root / "guide.md").write_text(saved)
    summary, config = index(root, registry, embedder)
    assert summary.documents["new"] == 1
    assert summary.embedding["chunks_embedded"] == 0  # its texts are still in the cache
    assert registry.active_chunk_ids("docs") == fresh_chunk_ids(root, embedder, config)


def test_indexes_are_independent(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    a, _ = index(root, registry, embedder, name="a")
    b, _ = index(root, registry, embedder, name="b")
    assert b.documents["new"] == 3 and b.embedding["chunks_embedded"] == 0
    assert registry.active_chunk_ids("a") == registry.active_chunk_ids("b")


def test_a_document_that_turns_bad_keeps_its_indexed_version(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    index(root, registry, embedder)
    before = registry.active_chunk_ids("docs")
    (root / "guide.md").write_bytes(b"# Guide\n\ncaf\xe9 broken encoding\n")  # a bad edit
    (root / "notes" / "notes.rst").write_text("   \n")  # emptied: its content is gone
    summary, _ = index(root, registry, embedder)
    assert summary.documents["kept_on_error"] == 1 and summary.documents["deleted"] == 1
    reasons = {s["doc_id"]: s["reason"] for s in summary.skipped}
    assert reasons["guide.md"].startswith("not valid UTF-8") and reasons["notes/notes.rst"] == "empty document"
    guide = {r.chunk_id for r in registry.active_chunks("docs") if r.doc_id == "guide.md"}
    assert guide and guide <= before  # still served as last indexed
    assert not any(r.doc_id == "notes/notes.rst" for r in registry.active_chunks("docs"))


def test_a_bulk_load_refreshes_the_planner_statistics_a_small_change_does_not(tmp_path, registry, embedder):
    """After a run that grows the index by more than a fifth, the chunk, document and embedding cache
    tables are analyzed (autovacuum may be off): without statistics the planner scans every cached
    vector of the model to look up a few thousand."""
    def analyzed():
        rows = registry.conn.execute(
            "SELECT relname, analyze_count FROM pg_stat_user_tables WHERE relname IN ('chunks', 'documents', 'embeddings')")
        return dict(rows.fetchall())

    before = analyzed()
    src = write_tree(tmp_path / "src", {f"d{i}.txt": f"Document {i} about the wing spar number {i}.\n" for i in range(30)})
    run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    after_bulk = analyzed()
    assert all(after_bulk[t] == before.get(t, 0) + 1 for t in ("chunks", "documents", "embeddings")), (before, after_bulk)
    (src / "d3.txt").write_text("Document 3 now about the flap hinge.\n")
    run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    assert analyzed() == after_bulk  # one document of thirty: no analyze

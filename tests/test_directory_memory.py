"""A directory source remembers each file's status: a run reads only the files whose inode, size,
modification or change time moved since the last run that succeeded, and a file changed just before a
scan is read again by the next one (a write in the same clock tick leaves the status as it was)."""

from __future__ import annotations

import os

import pytest

from conftest import write_tree
from pipeline.chunking import chunker_version
from pipeline.config import IndexConfig
from pipeline.embedding import prefixes_of
from pipeline.runner import run_index
from pipeline.sources import ListingMemory, scan_source
from pipeline.sources import directory as directory_source

pytestmark = pytest.mark.db

FILES = {
    "guide.md": "# Guide\n\nRagpipe keeps a retrieval index in step with its sources.\n\n## Usage\n\nRun it hourly.\n",
    "notes/wings.txt": "Swept wings flutter at transonic speed; the tunnel shows it.\n",
    "bin.txt": b"\x00\x01binary",
}


def index(root, registry, embedder, **kw):
    return run_index(str(root), registry, embedder, IndexConfig(index="docs", lock_timeout=5, **kw))


def memory(registry, embedder, context: str | None = None) -> ListingMemory:
    from pipeline.chunking import DEFAULT_CONTEXT

    version = chunker_version(embedder.model_id, embedder.max_tokens, prefixes_of(embedder).passage,
                              context or DEFAULT_CONTEXT)
    return ListingMemory(lambda uri: registry.source_objects("docs", uri), registry.document_states("docs"), version)


@pytest.fixture
def settled(monkeypatch):
    """Files written before the scan count as settled (the tests do not wait out the racy window)."""
    monkeypatch.setattr(directory_source, "RACY_SECONDS", 0.0)


def test_an_unchanged_tree_is_not_read_and_a_recorded_skip_is_repeated(tmp_path, registry, embedder, settled):
    root = write_tree(tmp_path / "src", FILES)
    first = index(root, registry, embedder)
    assert first.documents["new"] == 2 and [s["doc_id"] for s in first.skipped] == ["bin.txt"]
    rows = registry.source_objects("docs", root.resolve().as_uri())
    assert set(rows) == {"guide.md", "notes/wings.txt", "bin.txt"}
    assert rows["bin.txt"].skip_reason.startswith("binary file") and rows["guide.md"].content_hash

    scan = scan_source(root, memory=memory(registry, embedder))
    assert scan.documents == [] and scan.unread == ["guide.md", "notes/wings.txt"]
    assert [s.doc_id for s in scan.skipped] == ["bin.txt"] and scan.skipped[0].reason.startswith("binary file")
    second = index(root, registry, embedder)
    assert second.documents["unchanged"] == 2 and second.version is None and second.skipped == first.skipped


def test_an_edit_that_keeps_size_and_modification_time_is_read(tmp_path, registry, embedder, settled):
    root = write_tree(tmp_path / "src", FILES)
    index(root, registry, embedder)
    path = root / "notes" / "wings.txt"
    before = path.stat()
    path.write_text(FILES["notes/wings.txt"].replace("Swept", "Delta"))  # same length
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a copy that keeps times would
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    scan = scan_source(root, memory=memory(registry, embedder))
    assert [d.doc_id for d in scan.documents] == ["notes/wings.txt"] and scan.unread == ["guide.md"]
    summary = index(root, registry, embedder)
    assert summary.documents["changed"] == 1 and summary.documents["unchanged"] == 1


def test_a_file_changed_just_before_the_scan_is_read_again_next_time(tmp_path, registry, embedder, monkeypatch):
    root = write_tree(tmp_path / "src", FILES)
    index(root, registry, embedder)  # written a moment ago: within the racy window
    rows = registry.source_objects("docs", root.resolve().as_uri())
    assert {r.etag for r in rows.values()} == {directory_source.RACY}
    scan = scan_source(root, memory=memory(registry, embedder))
    assert [d.doc_id for d in scan.documents] == ["guide.md", "notes/wings.txt"] and scan.unread == []
    monkeypatch.setattr(directory_source, "RACY_SECONDS", 0.0)  # as if the window had passed
    assert index(root, registry, embedder).documents["unchanged"] == 2
    assert scan_source(root, memory=memory(registry, embedder)).documents == []


def test_deletes_moves_and_another_chunker_follow_the_tree(tmp_path, registry, embedder, settled):
    root = write_tree(tmp_path / "src", FILES)
    index(root, registry, embedder)
    (root / "guide.md").rename(root / "moved.md")  # the same inode under another name
    summary = index(root, registry, embedder)
    assert (summary.documents["new"], summary.documents["deleted"], summary.documents["unchanged"]) == (1, 1, 1)
    assert set(registry.source_objects("docs", root.resolve().as_uri())) == {"moved.md", "notes/wings.txt",
                                                                            "bin.txt"}
    # another chunker configuration reads every file again, since its documents would differ
    scan = scan_source(root, memory=memory(registry, embedder, context="title"))
    assert [d.doc_id for d in scan.documents] == ["moved.md", "notes/wings.txt"]
    again = index(root, registry, embedder, chunk_context="title")
    assert again.version is not None and again.documents["changed"] == 2

"""Garbage collection: the embedding cache keeps what retained versions use and drops old entries
nothing uses; the download cache keeps copies of retained versions only; `ragpipe gc` reports both."""

import os
import time

import numpy as np
import pytest

from conftest import write_tree
from pipeline.config import IndexConfig
from pipeline.gc import PARTIAL_GRACE_S, collect_all, collect_download_cache
from pipeline.runner import RunOptions, run_index
from registry import FeedbackEntry, StatsDelta
from retrieval.artifacts import download_directory

pytestmark = pytest.mark.db

DAY = 86400.0


def cached(registry) -> set[tuple[str, str]]:
    return set(registry.conn.execute("SELECT model_id, chunk_hash FROM embeddings").fetchall())


def used_hashes(registry, index: str = "docs") -> set[str]:
    return {r[0] for r in registry.conn.execute("SELECT chunk_hash FROM chunks WHERE index_name = %s", [index])}


def age_entries(registry, days: float, *, except_hashes: tuple[str, ...] = ()) -> None:
    registry.conn.execute(
        "UPDATE embeddings SET created_at = now() - make_interval(days => %s) WHERE NOT chunk_hash = ANY(%s)",
        [days, list(except_hashes)])


def test_embedding_cache_gc_keeps_what_retained_versions_use(tmp_path, registry, embedder):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha text.\n", "b.md": "# B\n\nBeta text.\n"})
    config = IndexConfig(retention=5, embedding_cache_ttl=30 * DAY)
    first = run_index(str(src), registry, embedder, config)
    (src / "b.md").write_text("# B\n\nBeta, revised.\n")
    second = run_index(str(src), registry, embedder, config)
    old_b = used_hashes(registry) - {r.chunk_hash for r in registry.active_chunks("docs")}
    assert len(old_b) == 1  # the first version's chunk of b.md: superseded, still in a retained version
    vector = np.ones((1, embedder.dim), dtype=np.float32) / np.sqrt(embedder.dim)
    registry.store_embeddings("retired-model", sorted(old_b), vector)  # a model no version uses
    registry.store_embeddings(embedder.model_id, ["orphan-old"], vector)  # a text no chunk has
    registry.store_embeddings(embedder.model_id, ["orphan-young"], vector)
    age_entries(registry, 31, except_hashes=("orphan-young",))
    before = cached(registry)

    report = collect_all(registry, config)
    assert report.versions_removed == [] and report.embeddings_removed == 2
    assert report.embedding_bytes == 2 * 4 * embedder.dim
    assert before - cached(registry) == {("retired-model", *old_b), (embedder.model_id, "orphan-old")}
    assert {h for m, h in cached(registry) if m == embedder.model_id} == used_hashes(registry) | {"orphan-young"}

    # retention 1: the first version goes, with the rows only it held; then its chunk's entry
    report = collect_all(registry, IndexConfig(retention=1, embedding_cache_ttl=30 * DAY))
    assert report.versions_removed == [first.version] and report.rows_removed == 1
    assert report.embeddings_removed == 1 and (embedder.model_id, *old_b) not in cached(registry)
    assert {h for m, h in cached(registry) if m == embedder.model_id} == used_hashes(registry) | {"orphan-young"}
    assert second.version == registry.head_version("docs").version

    # what gc kept is what the next runs need: a full rebuild embeds nothing, and bringing the old
    # text back embeds exactly the one entry gc dropped
    rebuilt = run_index(str(src), registry, embedder, config, options=RunOptions(full=True))
    assert rebuilt.version and rebuilt.embedding["chunks_embedded"] == 0
    (src / "b.md").write_text("# B\n\nBeta text.\n")
    reverted = run_index(str(src), registry, embedder, config)
    assert reverted.embedding == {**reverted.embedding, "chunks_embedded": 1, "chunks_cached": 0}


def stats_rows(registry) -> dict[str, int]:
    return dict(registry.conn.execute("SELECT version, count(*) FROM version_stats GROUP BY version").fetchall())


def serve(registry, alias: str, version: str, role: str = "live", queries: int = 3) -> None:
    """What one serving process writes of a version: ``queries`` latencies, half of them compared."""
    delta = StatsDelta(alias, version, role)
    for i in range(queries):
        delta.record(2.0 + i, 0.8 if i % 2 else None)
    registry.record_version_stats([delta])


def test_gc_removes_the_serving_statistics_of_gone_versions_and_keeps_their_feedback(tmp_path, registry, embedder):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha text.\n", "b.md": "# B\n\nBeta text.\n"})
    config = IndexConfig(retention=5)
    first = run_index(str(src), registry, embedder, config)
    (src / "b.md").write_text("# B\n\nBeta, revised.\n")
    second = run_index(str(src), registry, embedder, config)
    head = registry.head_version("docs")
    rejected = "docs_rejected"  # a build that failed validation: nobody serves it again either
    seq = registry.create_version(index="docs", version=rejected, parent=head.version, run_id=second.run_id,
                                  model_id=embedder.model_id, full_build=False)
    registry.abandon_version("docs", rejected, seq, "rejected: recall below the threshold")
    _version(registry, "kb_removed", "file:///kb_removed", "removed")  # another index's: not this gc's
    for version in (first.version, first.version, rejected, "kb_removed"):  # two processes served the first
        serve(registry, "docs" if version != "kb_removed" else "kb", version)
    serve(registry, "docs", second.version)
    serve(registry, "docs", second.version, "shadow")
    registry.record_feedback(FeedbackEntry(request_id="r1", index_name="docs", alias="docs", version=first.version,
                                           chunk_id=None, kind="thumbs", source="user", score=1.0, query="alpha"))
    assert stats_rows(registry) == {first.version: 2, rejected: 1, "kb_removed": 1, second.version: 2}

    report = collect_all(registry, IndexConfig(retention=1))
    assert report.versions_removed == [first.version] and report.stats_removed == 3
    assert report.to_dict()["stats_removed"] == 3
    assert stats_rows(registry) == {"kb_removed": 1, second.version: 2}  # the retained version's stay
    assert {(s.version, s.role, s.queries) for s in registry.version_stats("docs")} == {
        (second.version, "live", 3), (second.version, "shadow", 3)}
    # the feedback on the removed version is what a user said: it stays, reported under its status
    (quality,) = registry.quality_report("docs")
    assert (quality.version, quality.status, quality.count, quality.mean) == (first.version, "removed", 1, 1.0)

    # a reader that still held the removed version wrote once more: the next gc sweeps that too
    serve(registry, "docs", first.version)
    again = collect_all(registry, IndexConfig(retention=1))
    assert again.versions_removed == [] and again.stats_removed == 1
    assert stats_rows(registry) == {"kb_removed": 1, second.version: 2}

    # a run removing a version (past the retention) removes its statistics with it
    (src / "a.md").write_text("# A\n\nAlpha, revised.\n")
    third = run_index(str(src), registry, embedder, IndexConfig(retention=1))
    assert third.gc["versions_removed"] == [second.version] and third.gc["stats_removed"] == 2
    assert stats_rows(registry) == {"kb_removed": 1}


def test_embedding_cache_gc_waits_for_the_age_and_spares_what_another_index_uses(tmp_path, registry, embedder):
    write_tree(tmp_path / "one", {"shared.txt": "Shared paragraph.\n", "own.txt": "Only index one has this.\n"})
    write_tree(tmp_path / "two", {"copy.txt": "Shared paragraph.\n"})
    run_index(str(tmp_path / "one"), registry, embedder, IndexConfig(index="one"))
    run_index(str(tmp_path / "two"), registry, embedder, IndexConfig(index="two"))
    (tmp_path / "empty").mkdir()
    run_index(str(tmp_path / "empty"), registry, embedder, IndexConfig(index="one", allow_delete_all=True, retention=1))
    assert used_hashes(registry, "one") == set()  # index one keeps no chunk: both its entries are unused by it
    shared, = used_hashes(registry, "two")
    age_entries(registry, 10)

    young = collect_all(registry, IndexConfig(index="one", embedding_cache_ttl=30 * DAY))
    assert young.embeddings_removed == 0 and len(cached(registry)) == 2
    old = collect_all(registry, IndexConfig(index="one", embedding_cache_ttl=5 * DAY))
    assert old.embeddings_removed == 1 and cached(registry) == {(embedder.model_id, shared)}


def _version(registry, name: str, uri: str, status: str) -> None:
    seq = registry.create_version(index="kb", version=name, parent=None, run_id=1, model_id="m", full_build=True)
    registry.mark_version_built(name, uri, {})
    if status in ("validated", "removed"):
        registry.mark_version_validated(name, {})
    if status == "removed":
        assert registry.mark_removed("kb", [name]) == [name]
    if status == "rejected":
        registry.abandon_version("kb", name, seq, "test")


def _files(path, size: int = 1000) -> None:
    path.mkdir(parents=True)
    (path / "vectors.hnsw").write_bytes(b"x" * size)


def test_download_cache_keeps_copies_of_retained_versions_only(tmp_path, registry):
    cache = registry.home / "cache"
    root = "s3://bucket/prefix/kb"
    for name, status in [("kb_live", "validated"), ("kb_building", "building"), ("kb_removed", "removed"),
                         ("kb_rejected", "rejected")]:
        _version(registry, name, f"{root}/{name}", status)
    copy = {name: download_directory(f"{root}/{name}", cache) for name in ("kb_live", "kb_removed", "kb_rejected")}
    for path in copy.values():  # what retrievers downloaded
        _files(path)
    _files(copy["kb_live"].with_name("kb_live.download"))  # a download in flight: left alone
    stale = copy["kb_live"].with_name("kb_building.download")  # a killed download, hours old
    _files(stale)
    old = time.time() - PARTIAL_GRACE_S - 60
    for path in (stale, stale / "vectors.hnsw"):
        os.utime(path, (old, old))
    _files(copy["kb_removed"].with_name("kb_removed.download"))
    _files(cache / "kb" / "kb_removed")  # the artifact store's own copy of a remote parent
    _files(cache / "kb" / ".kb_removed.download")
    _files(cache / ".kb_rejected.tmp1234")  # what a killed remote build left before uploading
    _files(cache / ".kb_building.tmp5678")  # a remote build writing now
    _files(cache / "onnx" / "abc")  # the ONNX export of the model: not a version
    _files(download_directory("s3://bucket/prefix/other/other_1", cache))  # another index's copy

    result = collect_download_cache(registry.list_versions("kb"), cache, "kb")
    removed = {copy["kb_removed"], copy["kb_rejected"], stale, copy["kb_removed"].with_name("kb_removed.download"),
               cache / "kb" / "kb_removed", cache / "kb" / ".kb_removed.download", cache / ".kb_rejected.tmp1234"}
    assert set(result.directories) == {str(p) for p in removed}
    assert result.bytes == 1000 * len(removed)
    assert not any(p.exists() for p in removed)
    for kept in (copy["kb_live"], copy["kb_live"].with_name("kb_live.download"), cache / ".kb_building.tmp5678",
                 cache / "onnx" / "abc", download_directory("s3://bucket/prefix/other/other_1", cache)):
        assert (kept / "vectors.hnsw").is_file(), kept
    assert collect_download_cache(registry.list_versions("kb"), cache, "kb").directories == []


def test_cache_lookups_wait_for_a_cache_gc_and_see_what_it_deleted(registry, registry_config, embedder):
    import threading

    from registry import Registry
    from registry.queries import q

    vector = np.ones((1, embedder.dim), dtype=np.float32) / np.sqrt(embedder.dim)
    registry.store_embeddings("m", ["h"], vector)
    found: list[list[str]] = []
    with Registry.open(registry_config, migrate=False) as gc_side:
        with gc_side.conn.transaction():  # what collect_embeddings does: the lock, then its delete
            gc_side.conn.execute(q("lock_embedding_cache"))
            gc_side.conn.execute("DELETE FROM embeddings WHERE chunk_hash = 'h'")
            lookup = threading.Thread(target=lambda: found.append(registry.missing_embeddings("m", ["h"])))
            lookup.start()
            lookup.join(1.0)
            # a lookup that did not wait would still find the entry (the delete is not committed
            # yet), and its run would fail at build time when the entry is gone
            assert lookup.is_alive() and found == []
        lookup.join(10)
    assert found == [["h"]]

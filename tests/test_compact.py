"""Compaction on a real PostgreSQL: many small upsert segments merged as the tiered policy asks into a
new version with the same chunk set and hits; a merge that loses a race to a newer publish is discarded."""

import io
import json

import numpy as np
import pytest

from pipeline.compaction import compact_index, segment_stats, wanted_merges
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store, run_index
from pipeline.segments.policy import TieredPolicy, allowed_segments
from pipeline.upsert import delete_documents, upsert_documents
from pipeline.verify import verify_index
from retrieval import Retriever
from version_files import chunk_rows, files_of, manifest_of, opened

pytestmark = pytest.mark.db

CONFIG = IndexConfig(lock_timeout=5, min_recall=0.9)


def upsert(registry, embedder, doc_id, text):
    line = json.dumps({"doc_id": doc_id, "text": text}) + "\n"
    return upsert_documents(io.BytesIO(line.encode()), registry, embedder, CONFIG).summary


@pytest.fixture
def fragmented(tmp_path, registry, embedder):
    """A snapshot of 40 reports, then 12 single-document upserts and a delete: 12 segments."""
    src = tmp_path / "base.jsonl"
    src.write_text("".join(json.dumps({"doc_id": f"r{i:02d}", "text": f"Report {i}: the wing at Mach {i / 10:.1f} "
                                       f"in tunnel {i % 7}."}) + "\n" for i in range(40)))
    run_index(str(src), registry, embedder, CONFIG)
    for i in range(12):
        upsert(registry, embedder, f"fresh/{i:02d}", f"Fresh page {i} on airship number {i} and its gas cells.")
    delete_documents(["r05", "fresh/03"], registry, embedder, CONFIG)
    return registry.head_version("docs").version


def test_compact_merges_small_segments_into_a_version_with_the_same_chunks_and_hits(fragmented, registry,
                                                                                     registry_config, embedder):
    before = manifest_of(registry, CONFIG, fragmented)
    assert len(before.segments) == 12  # fresh/03's segment, all of it deleted, is listed no more
    policy = TieredPolicy()
    report = compact_index(registry, CONFIG, policy=policy)
    assert report.status == "published" and report.base == fragmented and report.segments_before == 12
    after = manifest_of(registry, CONFIG, report.version)
    bound = allowed_segments([1.0] * len(after.segments), policy)
    assert report.segments_after == len(after.segments) <= bound
    assert after.deleted == 0 < before.deleted  # the merges dropped the deleted chunks
    assert registry.list_aliases()[0].version == report.version
    # no chunk set changed: the same rows, the same BM25 scores, every chunk found by its own vector
    assert chunk_rows(registry, CONFIG, report.version) == chunk_rows(registry, CONFIG, fragmented)
    old, new = opened(registry, CONFIG, fragmented), opened(registry, CONFIG, report.version)
    keys = old.live_keys()
    for query in ["airship gas cells", "wing Mach tunnel 3", "fresh page 7"]:
        assert old.bm25_scores(query, keys).round(9).tolist() == new.bm25_scores(query, keys).round(9).tolist()
    assert (new.knn(new.vectors_of(keys[:1])[0], 1)[0] == keys[:1]).all()
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok
    assert not wanted_merges(files_of(registry, CONFIG), after, policy)  # within the policy: nothing more to do
    again = compact_index(registry, CONFIG, policy=policy)
    assert again.status == "nothing to do" and again.version is None
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False) as r:
        assert r.search("airship number 7 gas cells", k=1)[0].doc_id == "fresh/07"


def test_a_merge_that_lost_the_race_to_a_newer_publish_is_discarded(fragmented, registry, registry_config, embedder):
    from registry import Registry

    def publish_meanwhile():
        with Registry.open(registry_config, migrate=False) as other:
            upsert(other, embedder, "fresh/racer", "A page published while the merge ran.")

    report = compact_index(registry, CONFIG, before_swap=publish_meanwhile)
    assert report.status == "discarded" and "was published while merging" in report.reason
    head = registry.head_version("docs").version
    assert head != fragmented and registry.list_aliases()[0].version == head
    assert "fresh/racer" in {r["doc_id"] for r in chunk_rows(registry, CONFIG, head)}
    listed = {ref.name for v in registry.list_versions("docs") if v.status != "removed"
              for m in [files_of(registry, CONFIG).read_version(v.version)] if m for ref in m.segments}
    assert set(files_of(registry, CONFIG).stored_segments()) == listed  # the discarded merge left nothing
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok
    assert compact_index(registry, CONFIG).status == "published"  # the next attempt merges the new head


def test_a_hundred_single_document_upserts_then_compact(tmp_path, registry, registry_config, embedder):
    """100 consecutive one-document upserts (a segment each), then one compaction: the segment count
    returns within the policy's bound, verify is clean, and the hits on a sample of queries are the
    same before and after."""
    src = tmp_path / "base.jsonl"
    src.write_text("".join(json.dumps({"doc_id": f"r{i:02d}", "text": f"Report {i}: the wing at Mach {i / 10:.1f} "
                                       f"in tunnel {i % 7}."}) + "\n" for i in range(30)))
    base = run_index(str(src), registry, embedder, CONFIG)
    for i in range(100):
        # new documents, and every tenth upsert replaces an earlier one (its old chunk deleted)
        doc_id = f"fresh/{i:03d}" if i % 10 else f"r{i // 10:02d}"
        summary = upsert(registry, embedder, doc_id, f"Upserted page {i} on airship {i % 13} and gas cell {i}.")
        assert summary.status == "succeeded" and summary.embedding["chunks_embedded"] == 1
    head = registry.head_version("docs").version
    before = manifest_of(registry, CONFIG, head)
    assert len(before.segments) == 101 and before.deleted == 10
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok

    policy = TieredPolicy()
    old = opened(registry, CONFIG, head)
    queries = ["airship 7 gas cell", "wing Mach tunnel 3", "upserted page 42", "report 25", "gas cell 99"]
    keys = old.live_keys()
    vectors = embedder.embed(queries)
    expected = [(old.bm25_top(q, 10), old.knn(v, 10, ef=len(keys))) for q, v in zip(queries, vectors)]

    report = compact_index(registry, CONFIG, policy=policy)
    assert report.status == "published" and report.base == head and report.segments_before == 101
    after = manifest_of(registry, CONFIG, report.version)
    stats = segment_stats(files_of(registry, CONFIG), after)
    assert report.segments_after == len(after.segments) <= allowed_segments([s.size for s in stats], policy)
    assert len(after.segments) < 5 and after.deleted == 0
    assert base.version != head and registry.list_aliases()[0].version == report.version
    assert chunk_rows(registry, CONFIG, report.version) == chunk_rows(registry, CONFIG, head)
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok
    new = opened(registry, CONFIG, report.version)
    assert new.live_keys().tolist() == keys.tolist()
    for (q, v), ((bm25_keys, bm25_scores), (knn_keys, knn_dist)) in zip(zip(queries, vectors), expected):
        got_keys, got_scores = new.bm25_top(q, 10)
        assert got_keys.tolist() == bm25_keys.tolist()
        np.testing.assert_allclose(got_scores, bm25_scores, rtol=0, atol=1e-6)
        got_knn, got_dist = new.knn(v, 10, ef=len(keys))
        np.testing.assert_allclose(got_dist, knn_dist, rtol=0, atol=1e-5)  # the same neighbours' distances,
        inside = knn_dist < knn_dist[-1] - 1e-5  # and the same keys, but for ties at the tenth place
        assert set(got_knn[inside].tolist()) == set(knn_keys[inside].tolist())
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False) as r:
        assert r.version == report.version
        assert r.search("airship 5 gas cell 57", k=1)[0].doc_id == "fresh/057"


def test_compaction_gives_a_segment_published_without_a_graph_its_graph(tmp_path, registry, registry_config, embedder):
    """A run publishes a small segment at once, searched exactly; once it holds the policy's
    ``index_rows`` chunks, compaction rewrites it with its graph: same chunks, same hits."""
    src = tmp_path / "base.jsonl"
    src.write_text("".join(json.dumps({"doc_id": f"r{i:02d}", "text": f"Report {i}: the wing at Mach {i / 10:.1f} "
                                       f"in tunnel {i % 7}."}) + "\n" for i in range(40)))
    base = run_index(str(src), registry, embedder, CONFIG).version
    (segment,) = opened(registry, CONFIG, base).parts
    assert segment.segment.graph is None  # 40 chunks, under RAGPIPE_EXACT_SEGMENT_ROWS
    report = compact_index(registry, CONFIG, policy=TieredPolicy(index_rows=20))
    assert report.status == "published" and [m["reason"] for m in report.merges] == ["index"]
    indexed = opened(registry, CONFIG, report.version)
    assert all(p.segment.graph is not None for p in indexed.parts)
    assert all(p.ref.ef is not None and p.ref.ef >= 100 for p in indexed.parts)  # a build's least breadth
    assert chunk_rows(registry, CONFIG, report.version) == chunk_rows(registry, CONFIG, base)
    assert verify_index(registry, artifact_store(CONFIG, registry.home), "docs", "docs").ok
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False) as r:
        assert r.version == report.version and r.search("wing at Mach 1.7 in tunnel 3", k=1)[0].doc_id == "r17"

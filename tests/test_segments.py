"""Segments: files written once and checked when read, versions as manifests with deletion sets, and
search across segments whose results do not depend on the layout (BM25 against rank-bm25, vectors
against exact search)."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipeline.deterministic import synthetic_chunk_table, synthetic_texts
from pipeline.segments.tuning import choose_ef
from pipeline.segments.writer import SegmentInputError, SegmentWriter
from retrieval.bm25 import Analyzer
from retrieval.errors import VersionCorrupt
from retrieval.segments import Segment, SegmentPool, SegmentRef, SegmentStore, VersionManifest
from retrieval.segments import files as f
from segment_fixtures import (builtin_texts, delete, embed, exact_top, open_version, params, recall_at,
                              split_layout, version_manifest, write_segment)


@pytest.fixture
def store(tmp_path):
    return SegmentStore(tmp_path / "docs")


@pytest.fixture
def pool(store):
    return SegmentPool(store)


# -- files ---------------------------------------------------------------------------------------------

def test_a_segment_holds_its_chunks_and_lists_every_file_with_its_checksum(store):
    texts = synthetic_texts(0, 300, vocabulary=800)
    keys = list(range(1000, 1300))[::-1]  # rows not in key order
    vectors = embed(texts)
    ref = write_segment(store, keys, texts, vectors, batch=37)
    assert store.segment_names() == [ref.name] and f.SEGMENT_NAME.match(ref.name)
    assert [p.name for p in store.segments_dir.iterdir()] == [ref.name]  # no temporary directory left
    seg = Segment(store.segment_path(ref.name))
    assert set(seg.manifest.files) == set(f.DATA_FILES) and seg.rows == 300
    assert seg.keys.tolist() == keys and np.array_equal(seg.vectors, vectors)
    assert seg.chunks.column("text").to_pylist() == texts
    assert seg.rows_of(np.array([1299, 1000, 5])).tolist() == [0, 299, -1]
    assert seg.chunk(1)["chunk_key"] == keys[1]
    assert (np.diff(seg.term_hashes.astype(np.float64)) > 0).all()
    assert not seg.vectors.flags.owndata and not seg.posting_rows.flags.owndata  # views of the mapped files
    # the postings are those of the analyzed texts, in whatever batches they were streamed
    analyzer = Analyzer()
    terms = seg.terms()
    row = 5
    found = {terms[t]: int(seg.posting_tfs[i]) for t in range(len(terms))
             for i in range(seg.offsets[t], seg.offsets[t + 1]) if seg.posting_rows[i] == row}
    assert found == dict(Counter(analyzer.terms(texts[row])))
    assert seg.doc_lengths[row] == len(analyzer.terms(texts[row]))
    one = Segment(store.segment_path(write_segment(store, keys, texts, vectors, batch=300).name))
    for name in (f.POSTING_ROWS_FILE, f.POSTING_TFS_FILE, f.OFFSETS_FILE, f.DF_FILE, f.TERM_HASHES_FILE):
        assert np.array_equal(np.load(one.directory / name), np.load(seg.directory / name)), name


@pytest.mark.parametrize("name", [f.POSTING_ROWS_FILE, f.VECTORS_FILE, f.CHUNKS_FILE, f.GRAPH_FILE])
def test_a_damaged_segment_file_is_refused_naming_it(store, name):
    ref = write_segment(store, list(range(50)), synthetic_texts(0, 50, vocabulary=300))
    path = store.segment_path(ref.name) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VersionCorrupt, match=f"segment {ref.name}.*{name} does not match"):
        Segment(store.segment_path(ref.name))
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(VersionCorrupt, match=f"{name} does not match its manifest checksum: it has"):
        Segment(store.segment_path(ref.name), verify=False)


def test_bad_batches_are_refused_naming_the_chunk_and_leave_no_segment(store):
    texts = synthetic_texts(0, 4, vocabulary=50)
    table = synthetic_chunk_table([1, 2, 3, 4], texts)
    vectors = embed(texts)
    nan = vectors.copy()
    nan[2, 0] = np.nan
    cases = [(nan, table, "chunk 3: its vector holds NaN"),
             (vectors[:, :10], table, r"shape \(4, 10\), expected \(4, 64\)"),
             (vectors, table.drop_columns(["text"]), "lacks the fields text"),
             (vectors, synthetic_chunk_table([1, 2, 2, 4], texts), "chunk key 2 appears twice")]
    for vecs, tab, message in cases:
        with pytest.raises(SegmentInputError, match=message), SegmentWriter(store, params()) as writer:
            writer.add(tab, vecs)
    with pytest.raises(SegmentInputError, match="chunk key 4 was written twice"), SegmentWriter(store, params()) as w:
        w.add(table, vectors)
        w.add(synthetic_chunk_table([4], texts[:1]), vectors[:1])
        w.finish()
    assert list(store.segments_dir.iterdir()) == []


# -- version manifests and deletion sets ---------------------------------------------------------------

def test_version_manifest_round_trips_and_bad_ones_are_refused_naming_the_field(store, pool):
    ref = write_segment(store, list(range(40)), synthetic_texts(0, 40, vocabulary=200))
    ref = delete(store, pool, ref, [3, 5])
    manifest = version_manifest([ref])
    assert VersionManifest.from_json(manifest.to_json()) == manifest
    assert manifest.chunks == 38 and manifest.deleted == 2
    child = manifest.child("v2", [ref], run_id=7)
    assert child.parent == "v1" and child.run_id == 7 and child.model_id == manifest.model_id
    import json
    good = json.loads(manifest.to_json())
    for change, message in [(lambda d: d.pop("model_id"), "field 'model_id' is missing"),
                            (lambda d: d.update(dim="64"), "field 'dim' is str"),
                            (lambda d: d.update(format=2), "format 2 is not 3"),
                            (lambda d: d["counts"].update(chunks=39), "counts .* disagree"),
                            (lambda d: d["segments"].append(d["segments"][0]), "listed twice"),
                            (lambda d: d["segments"][0].update(deleted=50), "50 of 40 rows deleted"),
                            (lambda d: d["segments"][0].update(name="x"), "'x' is not a segment name")]:
        bad = json.loads(json.dumps(good))
        change(bad)
        with pytest.raises(VersionCorrupt, match=message):
            VersionManifest.from_json(json.dumps(bad), "version v1")
    with pytest.raises(ValueError, match="is not in"):
        store.write_version(version_manifest([SegmentRef("seg-" + "0" * 32, 3)]))


def test_deletion_sets_are_unions_named_by_content_and_checked(store, pool):
    ref = write_segment(store, list(range(100)), synthetic_texts(0, 100, vocabulary=200))
    a = delete(store, pool, ref, [7, 3])
    b = delete(store, pool, delete(store, pool, ref, [3]), [7])
    assert a == b and a.deleted == 2 and store.read_deletions(a).tolist() == [3, 7]  # one file, shared
    assert len(list(store.deletions_dir.iterdir())) == 2  # {3} and {3, 7}
    assert delete(store, pool, a, [3]) is a
    with pytest.raises(ValueError, match="chunk key 500 is not in segment"):
        delete(store, pool, a, [500])
    (store.deletions_dir / a.deletions).write_bytes(b"garbage")
    with pytest.raises(VersionCorrupt, match="does not match its manifest checksum"):
        open_version(store, [a])


# -- search across segments -----------------------------------------------------------------------------

def _corpus(n=1200):
    texts = builtin_texts() + synthetic_texts(0, n, vocabulary=2500)
    return list(range(10, 10 + 2 * len(texts), 2)), texts


def test_bm25_over_segments_with_deletions_equals_one_segment_and_rank_bm25(store, pool):
    from rank_bm25 import BM25Okapi

    keys, texts = _corpus()
    vectors = embed(texts)
    one = open_version(store, [write_segment(store, keys, texts, vectors, batch=200)], "one", pool)
    stale = {k + 1: texts[(i * 7) % len(texts)] + " revised" for i, k in enumerate(keys[::9])}
    many = open_version(store, split_layout(store, keys, texts, vectors, 5, stale, pool), "many", pool)
    assert many.size == one.size == len(keys) and many.manifest.deleted == len(stale)
    assert many.live_keys().tolist() == one.live_keys().tolist() == keys
    analyzer = Analyzer()
    reference = BM25Okapi([analyzer.terms(t) for t in texts])
    df = Counter(t for text in texts for t in set(analyzer.terms(text)))
    assert max(df.values()) > len(texts) / 2  # BM25Okapi's floor of negative idfs is reached
    queries = texts[:60:3] + ["wing lift drag", "boundary layer flow heat", "nothing-matches-this"]
    for query in queries:
        ref_scores = reference.get_scores(analyzer.terms(query))
        for version in (one, many):
            np.testing.assert_allclose(version.bm25_scores(query, keys), ref_scores, rtol=1e-9, atol=1e-9)
        k1, s1 = one.bm25_top(query, 10)
        k2, s2 = many.bm25_top(query, 10)
        assert k1.tolist() == k2.tolist(), query
        np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
        ref_order = np.lexsort((np.array(keys), -ref_scores))
        expected = [keys[i] for i in ref_order if ref_scores[i] > 0][:10]
        assert k1.tolist() == expected, query


def test_vector_search_skips_deletions_and_its_recall_does_not_depend_on_the_layout(store, pool):
    keys, texts = _corpus(2500)
    vectors = embed(texts)
    one = open_version(store, [write_segment(store, keys, texts, vectors, batch=500, recall_target=0.99)], "one", pool)
    stale = {k + 1: texts[(i * 5) % len(texts)] for i, k in enumerate(keys[::6])}  # near duplicates, deleted
    many = open_version(store, split_layout(store, keys, texts, vectors, 6, stale, pool), "many", pool)
    live = np.array(keys)
    queries = embed(synthetic_texts(50_000, 60, vocabulary=2500))  # chunk-like texts not in the index
    # at each segment's measured breadth (target 0.99 on its own vectors): several segments searched
    # at their breadths find at least what one does
    r_one = recall_at(one, vectors, live, queries)
    r_many = recall_at(many, vectors, live, queries)
    r_over = recall_at(many, vectors, live, queries, deletions="overfetch")
    assert r_one >= 0.97 and r_many >= r_one - 0.01 and abs(r_over - r_many) <= 0.01, (r_one, r_many, r_over)
    # at one breadth for all, the layouts agree within 0.01
    short = embed(synthetic_texts(60_000, 60, vocabulary=2500, words=(5, 15)))  # short, query-like
    r_one, r_many = recall_at(one, vectors, live, short, ef=300), recall_at(many, vectors, live, short, ef=300)
    assert abs(r_one - r_many) <= 0.01 and r_one >= 0.98, (r_one, r_many)
    stale_keys = set(stale)
    for q in np.concatenate([queries[:20], embed(list(stale.values())[:20])]):
        for mode in ("filter", "overfetch"):
            found, dist = many.knn(q, 10, deletions=mode)
            assert not set(found.tolist()) & stale_keys and len(found) == 10
            assert (np.diff(dist) >= 0).all()


def test_a_segment_with_fewer_live_chunks_than_asked_is_searched_exactly(store, pool):
    texts = synthetic_texts(0, 40, vocabulary=300)
    vectors = embed(texts)
    ref = write_segment(store, list(range(40)), texts, vectors)
    version = open_version(store, [delete(store, pool, ref, list(range(3, 40)))], "v1", pool)
    found, dist = version.knn(vectors[1], 10)
    assert sorted(found.tolist()) == [0, 1, 2] and found[0] == 1
    assert exact_top(vectors[:3], np.arange(3), vectors[1], 3)[0].tolist() == found.tolist()
    assert version.bm25_top(texts[10], 10)[0].tolist() == version.bm25_top(texts[10], 10)[0].tolist()
    assert set(version.bm25_top(texts[10], 10)[0].tolist()) <= {0, 1, 2}
    with pytest.raises(KeyError):
        version.chunk(10)
    assert version.chunk(2)["text"] == texts[2]


def test_small_segments_without_a_graph_are_searched_exactly_with_the_same_bm25(store, pool):
    """Segments under the graph threshold hold every file but the graph; a version over them finds
    exactly the brute-force neighbours (deletions skipped) and scores BM25 as one indexed segment."""
    texts = synthetic_texts(0, 300, vocabulary=400)
    vectors = embed(texts)
    keys = list(range(300))
    one = open_version(store, [write_segment(store, keys, texts, vectors)], "one", pool)
    refs = [write_segment(store, keys[at:at + 100], texts[at:at + 100], vectors[at:at + 100], exact=True)
            for at in range(0, 300, 100)]
    assert all(not (store.segment_path(r.name) / f.GRAPH_FILE).exists() for r in refs)
    refs[1] = delete(store, pool, refs[1], [150, 151])
    many = open_version(store, refs, "many", pool)
    assert all(p.segment.graph is None for p in many.parts)
    live = np.array([k for k in keys if k not in (150, 151)])
    for q in range(0, 300, 37):
        found, dist = many.knn(vectors[q], 10)
        expected, _ = exact_top(vectors[live], live, vectors[q], 10)
        assert found.tolist() == expected.tolist()
    assert many.size == 298
    trimmed = open_version(store, [delete(store, pool, one.manifest.segments[0], [150, 151])], "one-trimmed", pool)
    for query in texts[::50]:
        k1, s1 = trimmed.bm25_top(query, 10)
        k2, s2 = many.bm25_top(query, 10)
        assert k1.tolist() == k2.tolist()
        np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)


def test_versions_share_the_segments_they_both_list(store, pool):
    texts = synthetic_texts(0, 200, vocabulary=500)
    base = write_segment(store, list(range(200)), texts)
    small = write_segment(store, [1000, 1001], synthetic_texts(5000, 2, vocabulary=500))
    v1 = open_version(store, [base], "v1", pool)
    v2 = open_version(store, [delete(store, pool, base, [4, 9]), small], "v2", pool)
    assert v1.parts[0].segment is v2.parts[0].segment  # loaded once, shared
    assert v1.size == 200 and v2.size == 200 and 4 in v1.live_keys() and 4 not in v2.live_keys()
    pool.retain([small.name])
    assert pool.loaded == [small.name]


def test_versions_listing_a_segment_with_the_same_deletions_share_its_live_rows_and_statistics(store, pool):
    """What a version reads of a segment through its deletion set is read once per pair: a following
    version that only adds a segment reads that segment alone."""
    texts = synthetic_texts(0, 200, vocabulary=500)
    base = write_segment(store, list(range(200)), texts)
    trimmed = delete(store, pool, base, [4, 9])
    v1 = open_version(store, [trimmed], "v1", pool)
    extra = write_segment(store, [1000], synthetic_texts(5000, 1, vocabulary=500))
    v2 = open_version(store, [trimmed, extra], "v2", pool)
    assert v2.parts[0].view is v1.parts[0].view
    assert v2.parts[0].live is not None and not v2.parts[0].live[4]
    # the statistics stay those of the live chunks: the same as a fresh pool's
    fresh = open_version(store, [trimmed, extra], "v2", SegmentPool(store))
    assert np.array_equal(fresh.df, v2.df) and fresh.avgdl == v2.avgdl
    v3 = open_version(store, [delete(store, pool, trimmed, [5]), extra], "v3", pool)
    assert v3.parts[0].view is not v1.parts[0].view and v3.size == 198
    pool.retain([base.name, extra.name], [(ref.name, ref.deletions) for ref in v3.manifest.segments])
    assert pool.view(v3.manifest.segments[0], "v3") is v3.parts[0].view  # kept
    assert pool.view(trimmed, "v1") is not v1.parts[0].view  # dropped with the versions that listed it


# -- search breadth by measurement -----------------------------------------------------------------------

def test_choose_ef_returns_the_smallest_breadth_reaching_the_target(store):
    texts = synthetic_texts(0, 3000, vocabulary=3000)
    vectors = embed(texts)
    seg = Segment(store.segment_path(write_segment(store, list(range(3000)), texts, vectors, batch=1000,
                                                   recall_target=0.98).name))
    assert seg.manifest.ef_search is not None and seg.manifest.recall_at_ef >= 0.98
    assert seg.manifest.recall_target == 0.98 and seg.ef == seg.manifest.ef_search
    choice = choose_ef(seg.graph, seg.vectors, seg.keys, 0.98)
    assert choice.reached and choice.ef == seg.manifest.ef_search
    recalls = dict(choice.measured)
    assert all(r < 0.98 for ef, r in recalls.items() if ef < choice.ef)
    # short query-like texts need a wider search than the chunks themselves; measured with them,
    # the breadth chosen reaches the target for them
    queries = embed(synthetic_texts(70_000, 150, vocabulary=3000, words=(3, 10)))
    for_queries = choose_ef(seg.graph, seg.vectors, seg.keys, 0.98, queries=queries)
    assert for_queries.reached and for_queries.ef >= choice.ef
    held_out = embed(synthetic_texts(80_000, 150, vocabulary=3000, words=(3, 10)))
    version = open_version(store, [SegmentRef(seg.name, seg.rows)])
    assert recall_at(version, vectors, seg.keys, queries, ef=for_queries.ef) >= 0.98
    assert recall_at(version, vectors, seg.keys, held_out, ef=for_queries.ef) >= 0.96
    unreachable = choose_ef(seg.graph, seg.vectors, seg.keys, 1.01, candidates=(10, 20))
    assert not unreachable.reached and unreachable.ef == 20 and len(unreachable.measured) == 2


def test_chunk_tables_are_arrow_ipc_files_mapped_without_copies(store):
    ref = write_segment(store, list(range(30)), synthetic_texts(0, 30, vocabulary=100))
    with pa.memory_map(str(store.segment_path(ref.name) / f.CHUNKS_FILE)) as source:
        table = pa.ipc.open_file(source).read_all()
        assert table.num_rows == 30
    assert pa.total_allocated_bytes() < 1 << 20


def test_a_build_reads_the_vectors_of_re_keyed_chunks_from_the_parents_segments(store, pool):
    """A re-chunked document's unchanged texts keep their hashes under new keys: their vectors come
    from the parent's segment files, the very values stored there."""
    from pipeline.segments.build import vectors_by_hash

    texts = synthetic_texts(0, 50, vocabulary=300)
    vectors = embed(texts)
    ref = write_segment(store, list(range(50)), texts, vectors)
    hashes = pool.get(ref.name).chunks.column("chunk_hash").to_pylist()
    found = vectors_by_hash(store, [ref], np.array([3, 7, 7, 49, 1000]))  # 1000: in no segment
    assert sorted(found) == sorted({hashes[3], hashes[7], hashes[49]})
    for key in (3, 7, 49):
        assert np.array_equal(found[hashes[key]], vectors[key])


def test_bm25_sums_over_the_rows_with_postings_or_over_every_row_with_the_same_scores(store, pool, monkeypatch):
    """Whichever way a segment's scores are summed (over the rows a query's postings reach, or over
    every row), the scores are equal to the last bit, deletions skipped."""
    import retrieval.segments.search as search

    texts = synthetic_texts(0, 400, vocabulary=600)
    ref = delete(store, pool, write_segment(store, list(range(400)), texts), [5, 17, 200])
    version = open_version(store, [ref], "v1", pool)
    queries = [" ".join(t.split()[:4]) for t in texts[::40]]
    results = {}
    for ratio in (0, 10**9):  # 0: every row; 10**9: the rows with postings
        monkeypatch.setattr(search, "SPARSE_RATIO", ratio)
        results[ratio] = [(version.bm25_top(q, 10), version.bm25_scores(q, list(range(400)))) for q in queries]
    for (dense_top, dense_all), (sparse_top, sparse_all) in zip(results[0], results[10**9]):
        assert dense_top[0].tolist() == sparse_top[0].tolist() and dense_top[1].tolist() == sparse_top[1].tolist()
        assert dense_all.tolist() == sparse_all.tolist() and dense_all[[5, 17, 200]].tolist() == [0.0, 0.0, 0.0]

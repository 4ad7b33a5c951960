"""Compaction: the tiered merge policy as a pure function (property tests), and merges of real segments
that keep a version's live chunks, their vectors and their BM25 scores."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.deterministic import synthetic_texts
from pipeline.segments.merge import merge_segments, replace_merged, segment_params
from pipeline.segments.policy import MIB, Merge, SegmentStats, TieredPolicy, allowed_segments, plan_merges
from retrieval.segments import SegmentPool, SegmentRef, SegmentStore, SegmentedVersion
from segment_fixtures import delete, embed, open_version, write_segment

CHUNK_BYTES = 4300  # a 384-dimensional chunk: vector, graph links, text, postings (see docs/benchmarks.md)


def _apply(segments: list[SegmentStats], merges: list[Merge], names) -> list[SegmentStats]:  # type: ignore[no-untyped-def]
    """The segments after running ``merges``: inputs replaced by one segment of their live chunks."""
    for merge in merges:
        inputs = [s for s in segments if s.name in merge.segments]
        live = sum(s.live for s in inputs)
        size = sum(s.size for s in inputs)
        segments = [s for s in segments if s.name not in merge.segments] + [
            SegmentStats(next(names), live, 0, int(size))]
    return segments


def _check_plan(segments: list[SegmentStats], merges: list[Merge], policy: TieredPolicy) -> None:
    named = [n for m in merges for n in m.segments]
    assert len(named) == len(set(named)), "a segment is in two merges"
    assert set(named) <= {s.name for s in segments}
    by_name = {s.name: s for s in segments}
    for m in merges:
        # more than max_merge_at_once inputs only when the result stays below the floor
        assert 1 <= len(m.segments) <= policy.max_merge_at_once or m.size <= policy.floor_bytes
        assert len(m.segments) >= 2 or m.reason == "deletes"
        if m.reason == "tiers":  # a merge grows its largest input by min_growth at least
            assert m.size >= policy.min_growth * max(by_name[n].size for n in m.segments) - 1e-6


def _within_policy(segments: list[SegmentStats], merges: list[Merge], after: list[SegmentStats],
                   policy: TieredPolicy) -> None:
    """After a plan: within the budget, or every segment left unmerged more than 1 / (min_growth - 1)
    times the next smaller one (no merge of them grows its largest input enough)."""
    if len(after) <= allowed_segments([s.size for s in segments], policy):
        return
    merged = {n for m in merges for n in m.segments}
    left = sorted((s.size for s in segments if s.name not in merged and s.size <= policy.max_merged_bytes / 2),
                  reverse=True)
    assert all(small < (policy.min_growth - 1) * large for large, small in zip(left, left[1:])), left


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=30_000), min_size=1, max_size=400),
       st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=50))
def test_small_adds_keep_the_segment_count_logarithmic(adds, delete_shares):
    policy = TieredPolicy()
    names = (f"s{i}" for i in itertools.count())
    segments: list[SegmentStats] = []
    for i, chunks in enumerate(adds):
        # each run adds a segment and deletes a share of one older segment's chunks
        if segments:
            old = segments[i % len(segments)]
            gone = int(old.live * delete_shares[i % len(delete_shares)] * 0.2)
            segments[i % len(segments)] = SegmentStats(old.name, old.live - gone, old.deleted + gone, old.bytes)
        segments.append(SegmentStats(next(names), chunks, 0, chunks * CHUNK_BYTES))
        merges = plan_merges(segments, policy)
        _check_plan(segments, merges, policy)
        after = _apply(segments, merges, names)
        _within_policy(segments, merges, after, policy)
        segments = after
        total = sum(s.size for s in segments)
        tiers = 1 + math.log(max(total, policy.floor_bytes) / policy.floor_bytes, policy.merge_factor)
        spread = math.log(max(s.size for s in segments) / min(s.size for s in segments), 1 / (policy.min_growth - 1))
        assert len(segments) <= policy.segments_per_tier * math.ceil(tiers) + math.ceil(spread) + 1
        assert all(s.deleted_share <= policy.deletes_pct_allowed for s in segments)


def _grow(policy: TieredPolicy, chunks_per_run: int, runs: int) -> tuple[int, int, float]:
    """Add ``runs`` segments of ``chunks_per_run`` chunks, each followed by the policy's merges: the
    most segments at any time, the chunks, and how often each chunk was rewritten on average."""
    names = (f"s{i}" for i in itertools.count())
    segments: list[SegmentStats] = []
    most, rewritten = 0, 0
    for _ in range(runs):
        segments.append(SegmentStats(next(names), chunks_per_run, 0, chunks_per_run * CHUNK_BYTES))
        merges = plan_merges(segments, policy)
        rewritten += sum(m.live for m in merges)
        segments = _apply(segments, merges, names)
        most = max(most, len(segments))
    chunks = sum(s.live for s in segments)
    return most, chunks, rewritten / chunks


def test_a_million_chunks_added_a_thousand_at_a_time_are_at_most_ten_segments():
    most, chunks, rewrites = _grow(TieredPolicy(), 1000, 1000)
    assert chunks == 1_000_000 and most <= 10
    assert rewrites < 6  # each chunk rewritten a few times (log of the growth), not once per run


def test_single_document_upserts_keep_few_segments_and_rewrite_each_chunk_a_logarithmic_number_of_times():
    # 100,000 upserts of 10 chunks each: 1M chunks
    most, chunks, rewrites = _grow(TieredPolicy(), 10, 100_000)
    assert chunks == 1_000_000 and most <= 10
    # a merge grows its largest input by 1.25x at least: ~log(1M / 10, 1.25) = 52 rewrites at most;
    # waived below the floor, every few upserts rewrote the whole segment below it (280 times per chunk)
    assert rewrites < 25


def test_one_big_segment_and_many_tiny_ones_merge_only_the_tiny_ones():
    """A full build's segment (100k chunks, 460 MB) and 21 one-document upserts: the tiny segments merge
    among themselves in one merge; the big one's graph is not rebuilt."""
    policy = TieredPolicy()
    big = SegmentStats("build", 100_000, 0, 460 * MIB)
    tiny = [SegmentStats(f"u{i:02d}", 3, 0, 3 * CHUNK_BYTES) for i in range(21)]
    merges = plan_merges([big, *tiny], policy)
    assert [(set(m.segments), m.reason) for m in merges] == [({t.name for t in tiny}, "tiers")]
    after = _apply([big, *tiny], merges, (f"m{i}" for i in itertools.count()))
    assert len(after) == 2 <= allowed_segments([s.size for s in [big, *tiny]], policy)
    # segments below the floor but many: still one merge each, never the big one
    mid = [SegmentStats(f"m{i:02d}", 2000, 0, 2000 * CHUNK_BYTES) for i in range(12)]  # 8 MB each
    merges = plan_merges([big, *mid, *tiny], policy)
    assert merges and all("build" not in m.segments for m in merges)
    assert len(_apply([big, *mid, *tiny], merges, (f"m{i}" for i in itertools.count()))) <= 4


def test_a_big_segment_is_rewritten_for_its_deletions_or_with_segments_of_its_own_tier():
    policy = TieredPolicy()
    tiny = [SegmentStats(f"u{i:02d}", 3, 0, 3 * CHUNK_BYTES) for i in range(21)]
    worn = SegmentStats("build", 75_000, 25_000, 460 * MIB)  # a quarter deleted: over the 20% allowed
    merges = plan_merges([worn, *tiny], policy)
    assert Merge(("build",), "deletes", 75_000, pytest.approx(345 * MIB)) in merges
    assert all(len(m.segments) > 1 for m in merges if m.reason == "tiers")
    assert not any("build" in m.segments and len(m.segments) > 1 for m in merges)
    # at 20% deleted it stays as it is
    assert not any("build" in m.segments for m in plan_merges([SegmentStats("build", 80_000, 20_000, 460 * MIB),
                                                               *tiny], policy))
    # six full builds of the same size exceed the budget (5): they merge among themselves
    peers = [SegmentStats(f"b{i}", 100_000, 0, 460 * MIB) for i in range(6)]
    merges = plan_merges(peers, policy)
    assert len(merges) == 1 and len(merges[0].segments) >= 2 and merges[0].reason == "tiers"
    assert len(_apply(peers, merges, (f"m{i}" for i in itertools.count()))) <= allowed_segments(
        [s.size for s in peers], policy)
    # a big segment and a few mid-sized ones that would grow it by less than 25%: left alone
    mids = [SegmentStats(f"m{i}", 5000, 0, 20 * MIB) for i in range(5)]
    merges = plan_merges([SegmentStats("build", 100_000, 0, 460 * MIB), *mids], policy)
    assert merges and all("build" not in m.segments for m in merges)


def test_segments_within_budget_are_left_alone_and_deleted_ones_rewritten():
    policy = TieredPolicy()
    three = [SegmentStats(f"s{i}", 10_000, 0, 10_000 * CHUNK_BYTES) for i in range(3)]
    assert plan_merges(three, policy) == []
    worn = three[:2] + [SegmentStats("s2", 7000, 3000, 10_000 * CHUNK_BYTES)]
    assert plan_merges(worn, policy) == [Merge(("s2",), "deletes", 7000, pytest.approx(7000 * CHUNK_BYTES))]
    huge = [SegmentStats(f"h{i}", 10**6, 0, 4 * 1024 * MIB) for i in range(12)]  # too large to merge
    assert plan_merges(huge, policy) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 5000), st.integers(1, 2000 * MIB)), max_size=60))
def test_plans_name_each_segment_at_most_once_and_keep_every_live_chunk(specs):
    policy = TieredPolicy(floor_bytes=MIB)
    segments = [SegmentStats(f"s{i}", live, deleted, size) for i, (live, deleted, size) in enumerate(specs)]
    merges = plan_merges(segments, policy)
    _check_plan(segments, merges, policy)
    by_name = {s.name: s for s in segments}
    for m in merges:
        assert m.live == sum(by_name[n].live for n in m.segments)
    after = _apply(segments, merges, (f"m{i}" for i in itertools.count()))
    assert sum(s.live for s in after) == sum(s.live for s in segments)


# -- merging real segments ---------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return SegmentStore(tmp_path / "docs")


def _assert_same_chunks(a: SegmentedVersion, b: SegmentedVersion, queries: list[str]) -> None:
    keys = a.live_keys()
    assert keys.tolist() == b.live_keys().tolist()
    assert np.array_equal(a.vectors_of(keys), b.vectors_of(keys))  # stored vectors, never re-embedded
    for key in keys[::7].tolist():
        assert a.chunk(key) == b.chunk(key)
    for query in queries:
        np.testing.assert_allclose(a.bm25_scores(query, keys), b.bm25_scores(query, keys), rtol=0, atol=1e-9)
        assert a.bm25_top(query, 10)[0].tolist() == b.bm25_top(query, 10)[0].tolist()


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.lists(st.integers(0, 39), max_size=15)), min_size=2, max_size=5),
       st.integers(1, 90))
def test_a_merge_changes_no_live_chunk_set(tmp_path_factory, layout, batch_rows):
    store = SegmentStore(tmp_path_factory.mktemp("merge"))
    pool = SegmentPool(store)
    refs, start = [], 0
    for size, gone in layout:
        keys = list(range(start, start + size))
        ref = write_segment(store, keys, synthetic_texts(start, size, vocabulary=400), batch=9)
        doomed = sorted({start + g for g in gone if g < size})
        refs.append(delete(store, pool, ref, doomed) if doomed else ref)
        start += size
    before = open_version(store, refs, "v1", pool)
    merged = merge_segments(pool, refs, segment_params(before.manifest), batch_rows=batch_rows)
    assert merged.rows == before.size and merged.merged_from == tuple(r.name for r in refs)
    after = open_version(store, replace_merged(before.manifest, refs, merged, pool), "v2", pool)
    assert len(after.parts) == 1 and after.manifest.deleted == 0
    _assert_same_chunks(before, after, synthetic_texts(start, 5, vocabulary=400, words=(3, 8)))
    assert SegmentedVersion(store.read_version("v1"), SegmentPool(store)).size == before.size  # inputs intact


def test_the_policy_s_merges_keep_a_version_s_results(store):
    pool = SegmentPool(store)
    policy = TieredPolicy(floor_bytes=1 << 16, max_merged_bytes=1 << 30)
    refs = []
    for run in range(9):  # nine small runs, each deleting a few chunks of the first segment
        keys = list(range(run * 100, run * 100 + 60))
        refs.append(write_segment(store, keys, synthetic_texts(run * 100, 60, vocabulary=600)))
        refs[0] = delete(store, pool, refs[0], [run * 3, run * 3 + 1])
    version = open_version(store, refs, "v1", pool)
    stats = [SegmentStats(r.name, r.live, r.deleted, sum(i.bytes for i in pool.get(r.name).manifest.files.values()))
             for r in refs]
    merges = plan_merges(stats, policy)
    assert merges and {m.reason for m in merges} == {"tiers", "deletes"}
    manifest = version.manifest
    for i, m in enumerate(merges):
        base = [manifest.segment(n) for n in m.segments]
        out = merge_segments(pool, base, segment_params(manifest))
        manifest = manifest.child(f"m{i}", replace_merged(manifest, base, out, pool))
    store.write_version(manifest)
    compacted = SegmentedVersion(store.read_version(manifest.version), pool)
    assert len(compacted.parts) <= allowed_segments([s.size for s in stats], policy) < len(refs)
    queries = synthetic_texts(10_000, 8, vocabulary=600, words=(3, 10))
    _assert_same_chunks(version, compacted, queries)
    for q in embed(queries):
        assert set(compacted.knn(q, 10, ef=200)[0].tolist()) == set(version.knn(q, 10, ef=200)[0].tolist())


def test_deletions_published_while_a_merge_ran_carry_over_to_the_merged_segment(store):
    pool = SegmentPool(store)
    a = write_segment(store, list(range(30)), synthetic_texts(0, 30, vocabulary=200))
    b = write_segment(store, list(range(30, 50)), synthetic_texts(30, 20, vocabulary=200))
    v1 = open_version(store, [a, b], "v1", pool).manifest
    merged = merge_segments(pool, list(v1.segments), segment_params(v1))
    v2 = v1.child("v2", [delete(store, pool, a, [4]), delete(store, pool, b, [31, 32])])  # published meanwhile
    store.write_version(v2)
    v3 = v2.child("v3", replace_merged(v2, v1.segments, merged, pool))
    store.write_version(v3)
    assert v3.segments == (SegmentRef(merged.name, 50, 3, v3.segments[0].deletions, v3.segments[0].deletions_sha256),)
    assert store.read_deletions(v3.segments[0]).tolist() == [4, 31, 32]
    _assert_same_chunks(SegmentedVersion(v2, pool), SegmentedVersion(v3, pool), ["babe"])
    with pytest.raises(ValueError, match="left version v3 while it was merged"):
        replace_merged(v3, v1.segments, merged, pool)


def test_a_segment_published_without_a_graph_gets_one_once_it_is_large_enough():
    policy = TieredPolicy()
    big = SegmentStats("big", 250_000, 0, 1000 * MIB)
    flat = SegmentStats("flat", policy.index_rows, 0, 10 * MIB, exact=True)
    tiny = SegmentStats("tiny", policy.index_rows - 1, 0, 5 * MIB, exact=True)
    assert [(m.segments, m.reason) for m in plan_merges([big, flat, tiny], policy)] == [(("flat",), "index")]
    assert plan_merges([big, tiny], policy) == []

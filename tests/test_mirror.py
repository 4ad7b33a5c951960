"""Mirror statistics as pure logic: bounded memory, exact aggregates, safe updates from many threads."""

import statistics
import tracemalloc

import pytest

from conftest import run_threads
from retrieval.rollout import MirrorStats


def test_memory_stays_bounded_over_many_mirrored_queries():
    stats = MirrorStats(window=100)
    for i in range(1_000):
        stats.record(0.5, float(i), float(i))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            stats.record(i % 11 / 10, 1.0 + i % 7, 2.0 + i % 5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes retained by 100,000 more mirrored queries"
    assert stats.summary()["latency_window"] == 100


def test_summary_over_every_query_and_the_latency_window():
    stats = MirrorStats(window=4)
    assert stats.summary() == {"queries": 0}
    overlaps = [1.0, 0.0, 0.5, 0.5, 1.0, 0.25]
    for i, overlap in enumerate(overlaps):
        stats.record(overlap, primary_ms=10.0 * (i + 1), shadow_ms=100.0 + i)
    summary = stats.summary()
    assert summary["queries"] == 6 and summary["latency_window"] == 4
    assert summary["mean_overlap_at_10"] == pytest.approx(statistics.mean(overlaps))  # every query
    assert summary["primary_p50_ms"] == pytest.approx(statistics.median([30.0, 40.0, 50.0, 60.0]))  # the last 4
    assert summary["shadow_p50_ms"] == pytest.approx(statistics.median([102.0, 103.0, 104.0, 105.0]))


def test_updates_from_many_threads_are_all_counted():
    stats = MirrorStats(window=50)
    summaries = []

    def mirror(overlap):
        for i in range(5_000):
            stats.record(overlap, 1.0, 2.0)
            if i % 500 == 0:
                summaries.append(stats.summary())  # read while others write

    assert run_threads(mirror, [(n % 2 * 1.0,) for n in range(8)]) == []
    summary = stats.summary()
    assert summary["queries"] == 40_000 and summary["mean_overlap_at_10"] == pytest.approx(0.5)
    assert all(0.0 <= s["mean_overlap_at_10"] <= 1.0 and s["primary_p50_ms"] == 1.0 for s in summaries)

"""Rollout logic without a database: routing by key, guards, latency histograms, warm versions."""

import random

import pytest

from registry.rollout_stats import BUCKETS, LATENCY_BOUNDS_MS, Guard, StatsDelta, VersionStats, guard_breach, percentile_ms
from retrieval.rollout import StatsRecorder, WarmVersions, overlap_at_10, route_bucket, routes_to_canary


def test_routing_is_stable_per_key_and_near_the_percentage():
    keys = [f"session-{i}" for i in range(20_000)]
    routed = [routes_to_canary("docs", "docs_v2", 20.0, k) for k in keys]
    assert routed == [routes_to_canary("docs", "docs_v2", 20.0, k) for k in keys]  # the same key, the same side
    assert 0.19 < sum(routed) / len(keys) < 0.21
    wider = [routes_to_canary("docs", "docs_v2", 50.0, k) for k in keys]
    assert all(w for r, w in zip(routed, wider) if r)  # raising the share only adds keys
    assert 0.49 < sum(wider) / len(keys) < 0.51
    other = [routes_to_canary("docs", "docs_v3", 20.0, k) for k in keys]
    assert other != routed  # another canary draws another sample of keys
    assert not any(routes_to_canary("docs", "docs_v2", 0.0, k) for k in keys[:100])
    assert all(routes_to_canary("docs", "docs_v2", 100.0, k) for k in keys[:100])
    assert 0.0 <= route_bucket("docs", "docs_v2", "") < 100.0


def test_requests_without_a_key_are_routed_at_random():
    random.seed(3)
    share = sum(routes_to_canary("docs", "docs_v2", 30.0, None) for _ in range(20_000)) / 20_000
    assert 0.28 < share < 0.32


@pytest.mark.parametrize("text, metric, op, threshold", [
    ("overlap@10<0.6", "overlap@10", "<", 0.6), ("p95_ms>50", "p95_ms", ">", 50.0), (" p50_ms > 7.5 ", "p50_ms", ">", 7.5),
])
def test_guards_parse(text, metric, op, threshold):
    guard = Guard.parse(text)
    assert (guard.metric, guard.op, guard.threshold) == (metric, op, threshold)
    assert Guard.from_dict(guard.to_dict()) == guard


@pytest.mark.parametrize("text", ["recall<0.5", "overlap@10=0.6", "p95_ms>", "p95_ms>fast"])
def test_bad_guards_are_refused_with_the_reason(text):
    with pytest.raises(ValueError, match="METRIC<NUMBER or METRIC>NUMBER"):
        Guard.parse(text)


def test_guards_wait_for_the_minimum_count_then_name_the_breach():
    delta = StatsDelta("docs", "v2", "canary")
    for i in range(50):
        delta.record(80.0, overlap_at_10=0.4 if i < 10 else None)
    stats = VersionStats.from_sums("v2", "canary", delta.queries, delta.compared, delta.overlap_sum,
                                   delta.latency_buckets)
    overlap, slow = Guard.parse("overlap@10<0.6"), Guard.parse("p95_ms>50")
    assert guard_breach([overlap], stats, min_queries=20) is None  # 10 compared queries: not judged yet
    assert guard_breach([overlap], stats, min_queries=10) == (
        "guard overlap@10<0.6 breached: overlap@10 0.4 over 10 queries of canary v2")
    assert "p95_ms" in guard_breach([Guard.parse("p95_ms>500"), slow], stats, min_queries=50)
    assert guard_breach([Guard.parse("p95_ms>500")], stats, min_queries=50) is None
    assert guard_breach([overlap], None, 1) is None


def test_latency_percentiles_are_within_a_bucket():
    values = [1.0 + (i % 100) for i in range(1000)]  # 1..100 ms
    buckets = [0] * BUCKETS
    delta = StatsDelta("a", "v", "live")
    for v in values:
        delta.record(v)
    buckets = delta.latency_buckets
    exact = sorted(values)[int(0.95 * len(values)) - 1]
    p95 = percentile_ms(buckets, 0.95)
    assert exact <= p95 <= exact * 1.2
    assert percentile_ms([0] * BUCKETS, 0.5) is None
    assert len(LATENCY_BOUNDS_MS) + 1 == BUCKETS


def test_recorder_hands_out_deltas_once_and_takes_back_unwritten_ones():
    recorder = StatsRecorder()
    recorder.record("docs", "v1", "live", 2.0)
    recorder.record("docs", "v2", "canary", 3.0, 0.5)
    first = recorder.take()
    assert sorted((d.version, d.queries, d.compared) for d in first) == [("v1", 1, 0), ("v2", 1, 1)]
    assert recorder.take() == []
    recorder.record("docs", "v2", "canary", 4.0, 1.0)
    recorder.give_back(first)  # a write failed: nothing is lost
    merged = {d.version: d for d in recorder.take()}
    assert merged["v2"].queries == 2 and merged["v2"].overlap_sum == 1.5 and sum(merged["v2"].latency_buckets) == 2


class _Version:
    def __init__(self, name):
        self.info = type("Info", (), {"version": name})()


def test_warm_versions_expire_after_their_time():
    now = [0.0]
    warm = WarmVersions(10.0, clock=lambda: now[0])
    a, b = _Version("a"), _Version("b")
    warm.keep(a)
    now[0] = 5.0
    warm.keep(b)
    assert warm.names() == ["a", "b"]
    now[0] = 10.0
    assert warm.expire() == ["a"] and warm.names() == ["b"]
    assert warm.take("b") is b and warm.take("b") is None  # taken: it serves again
    off = WarmVersions(0.0)
    off.keep(a)
    assert off.names() == []


class _H:
    def __init__(self, chunk_id):
        self.chunk_id = chunk_id


def test_overlap_at_10_counts_the_reference_top_ten():
    ref = [_H(str(i)) for i in range(12)]
    assert overlap_at_10(ref, ref) == 1.0
    assert overlap_at_10([_H(str(i)) for i in range(5, 15)], ref) == 0.5
    assert overlap_at_10([], []) == 1.0 and overlap_at_10([], ref) == 0.0

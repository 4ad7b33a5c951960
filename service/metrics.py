"""Prometheus metrics of one service process: per-stage latency, batch sizes, queue depth, shed requests,
and, read at scrape time from the retrievers, the version each alias serves, versions refused, and
cache hit rates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batching import BatchStats
from service.indexes import ServedIndexes

# from a cached query (well under 1 ms) to a request that waited out a long queue
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STAGES = ("queue", "embed", "vector", "rank", "serialize", "request")


class ServiceMetrics:
    """The metrics objects of one app, in a registry of their own (several apps can share a process)."""

    def __init__(self, served: ServedIndexes) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram("ragpipe_serve_stage_seconds",
                                       "Seconds per stage: queue (a request's wait), embed / vector / rank / "
                                       "serialize (a batch's), request (a search request end to end)",
                                       ["stage"], buckets=_BUCKETS, registry=r)
        self.batch_queries = Histogram("ragpipe_serve_batch_queries", "Queries per encoder and HNSW call",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.requests = Counter("ragpipe_serve_requests", "Requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("ragpipe_serve_queue_depth", "Queries waiting for a batch", ["index"], registry=r)
        self.shed = Counter("ragpipe_serve_shed", "Requests shed with 429 because the queue was full",
                            ["index"], registry=r)
        self.deadline = Counter("ragpipe_serve_deadline_exceeded", "Requests answered 504: deadline passed",
                                ["index"], registry=r)
        self.feedback = Counter("ragpipe_serve_feedback", "Feedback scores recorded", ["kind", "source"], registry=r)
        r.register(_ServedCollector(served))

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_queries.observe(stats.queries)
        for wait in stats.waits:
            self.stage_seconds.labels("queue").observe(wait)
        for stage, seconds in stats.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServedCollector(Collector):
    """Read at each scrape: readiness, versions served and refused, cache hits and misses."""

    def __init__(self, served: ServedIndexes) -> None:
        self.served = served

    def collect(self) -> Iterator[Any]:
        statuses = self.served.status()
        ready = GaugeMetricFamily("ragpipe_serve_ready", "1 when every served alias has a loaded, verified version")
        ready.add_metric([], 1.0 if statuses and all(s.loaded for s in statuses) else 0.0)
        yield ready
        serving = GaugeMetricFamily("ragpipe_serve_version_served", "1 for the version each alias serves",
                                    labels=["index", "version"])
        refused = GaugeMetricFamily("ragpipe_serve_version_refused",
                                    "1 for each version an alias named that could not be loaded (damaged files); "
                                    "the alias keeps serving its previous version", labels=["index", "version"])
        degraded = GaugeMetricFamily("ragpipe_serve_degraded",
                                     "1 when the registry names a version this process refused", labels=["index"])
        for s in statuses:
            if s.serving is not None:
                serving.add_metric([s.alias, s.serving], 1.0)
            for version in s.refused:
                refused.add_metric([s.alias, version], 1.0)
            degraded.add_metric([s.alias], 1.0 if s.degraded else 0.0)
        yield serving
        yield refused
        yield degraded
        hits = CounterMetricFamily("ragpipe_serve_cache_hits", "Cache lookups answered", labels=["index", "cache"])
        misses = CounterMetricFamily("ragpipe_serve_cache_misses", "Cache lookups not answered",
                                     labels=["index", "cache"])
        ratio = GaugeMetricFamily("ragpipe_serve_cache_hit_ratio", "Hits over lookups since the alias was opened",
                                  labels=["index", "cache"])
        for alias, retriever in self.served.retrievers().items():
            for cache, (hit, miss) in retriever.cache_stats().items():
                hits.add_metric([alias, cache], hit)
                misses.add_metric([alias, cache], miss)
                ratio.add_metric([alias, cache], hit / (hit + miss) if hit + miss else 0.0)
        yield hits
        yield misses
        yield ratio


_COUNTED = {"/v1/search", "/v1/search_many", "/v1/feedback", "/v1/indexes", "/healthz", "/readyz", "/metrics", "/"}


class CountResponses:
    """ASGI middleware: counts responses by endpoint and status in ``ragpipe_serve_requests`` (the
    app's metrics live on ``app.state.service`` once its lifespan started)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _COUNTED else "other"

        async def counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                state = getattr(scope["app"].state, "service", None)
                if state is not None:
                    state.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)

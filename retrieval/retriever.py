"""The Retriever: hybrid BM25 + HNSW search over the version an alias serves, with attribution.

query ─► embed (cached) ─► HNSW top-N ─┐
      ─► analyze ─► BM25 top-N ────────┴─► fuse ─► rerank ─► filter ─► top-k Hits

The retriever follows its alias: a background thread listens for the registry's ``ragpipe_alias``
notifications (and polls as a fallback), loads a newly published version beside the current one and
switches to it with one reference assignment. A query holds the version it started with until it
returns, so every result list comes from exactly one version.

While the alias has a canary, the retriever holds it loaded too and routes each request by its
route key (retrieval.rollout); versions that stop serving stay loaded for ``warm_seconds``, so a
move back loads nothing. Caches (retrieval.caches): query vectors, exact results, semantic results.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from registry import Registry, RegistryConfig
from retrieval import telemetry
from retrieval.batch import BatchResult, Query
from retrieval.caches import CacheCounters, LRUCache, SemanticCache
from retrieval.config import ENV_FIELDS, Hits, RetrievalConfig
from retrieval.encoding import QueryEncoding
from retrieval.following import AliasFollowing
from retrieval.loaded import LoadedVersion
from retrieval.measuring import RolloutMeasuring
from retrieval.ranking import Ranker, normalized_filters
from retrieval.rerank import Reranker, make_reranker
from retrieval.rollout import MirrorStats, Rollout, StatsRecorder, WarmVersions, routes_to_canary
from retrieval.segmented import SegmentPools
from retrieval.segments.cache import SegmentCache

logger = logging.getLogger(__name__)


class Retriever(QueryEncoding, RolloutMeasuring, AliasFollowing):
    """Search the version an alias serves. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, registry_config: RegistryConfig, alias: str, config: RetrievalConfig,
                 encoder: Any = None) -> None:
        self._registry_config = registry_config
        self.alias = alias
        self.config = config
        self._cache_dir = registry_config.home / "cache"
        self._registry = Registry.open(registry_config)  # first use of a fresh database migrates it
        self._registry_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        given = [] if encoder is None else list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
        self._given: dict[str, Any] = {e.model_id: e for e in given}  # the caller's, by model
        self._pinned = set(self._given)
        self._encoders: dict[tuple[str, str | None], Any] = {}  # loaded on demand, by (model, encoder digest)
        self._encoder_lock = threading.Lock()
        self._reranker: Reranker | None = make_reranker(config.reranker, config.device)
        self._ranker = Ranker(config, self._reranker, alias)
        self._query_cache = LRUCache(config.query_cache_size)
        self._result_cache = LRUCache(config.result_cache_size)
        self._semantic: SemanticCache | None = (
            SemanticCache(config.semantic_cache_cosine, config.semantic_cache_size, config.semantic_cache_keys)
            if config.semantic_cache_size > 0 else None)
        self._shadow: LoadedVersion | None = None
        self._rollout: Rollout | None = None  # the alias's canary, when one runs
        self._warm = WarmVersions(config.warm_seconds)
        self._refused: dict[str, str] = {}  # damaged versions and why: never loaded (and hashed) again
        self.mirror = MirrorStats(config.mirror_window)
        self.stats = StatsRecorder()
        self.loads = 0  # versions read from their files so far (moves onto warm versions read none)
        self.segments = SegmentPools()  # each segment opened once, shared by the versions held
        # remote versions' segments, downloaded once into a bounded cache shared with other processes
        self.segment_cache = SegmentCache(self._cache_dir, config.segment_cache_bytes)
        self._closed = threading.Event()
        try:
            row = self._alias_row()
            self._current = self._load(self._info(row.version))
            self._refresh_canary(row)
            self._release_segments([v for v in self._held() if v is not None])
        except BaseException:
            self.segment_cache.close()
            self._registry.close()
            raise
        self._threads: list[threading.Thread] = []
        if config.follow:
            self._threads.append(threading.Thread(target=self._follow, name="ragpipe-follow", daemon=True))
        if config.stats_interval > 0:
            self._threads.append(threading.Thread(target=self._write_stats_every, name="ragpipe-stats", daemon=True))
        for thread in self._threads:
            thread.start()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, index: str = "docs", database_url: str | None = None, *, encoder: Any = None,
             **config: Any) -> "Retriever":
        """Open a retriever on the alias ``index`` (aliases are named after their index).

        Args:
            index: the alias to search.
            database_url: the registry; None reads ``RAGPIPE_DATABASE_URL``, else the embedded server.
            encoder: an object with ``model_id`` and ``embed(texts)`` to encode queries (an ONNX runner,
                say), or a list of them (one per model, for mirroring to a shadow version of another
                model); by default the model the version's manifest names.
            **config: any :class:`RetrievalConfig` field, plus ``home`` (ragpipe's home directory);
                the fields of :data:`retrieval.config.ENV_FIELDS` not given are read from
                ``RAGPIPE_SEMANTIC_CACHE_SIZE``, ``RAGPIPE_SEMANTIC_CACHE_COSINE``, ``RAGPIPE_WARM_SECONDS``,
                ``RAGPIPE_SEGMENT_CACHE_BYTES``, ... Versions in an object store are read from the URI
                the registry records for each; their segments are downloaded into ``HOME/cache``.

        Raises:
            AliasNotFound: nothing has been published to the alias yet.
            ModelMismatch: ``model`` is not the model the version was embedded with.
        """
        home = config.pop("home", None)
        registry_config = RegistryConfig.from_env(database_url=database_url, home=home)
        return cls(registry_config, index, RetrievalConfig.from_env(**config), encoder)

    @property
    def version(self) -> str:
        return self._current.info.version

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=5)
        try:
            if self.config.stats_interval > 0:
                self.write_stats()  # what the last interval measured
        except Exception:
            logger.warning("cannot write the last serving statistics of alias %s", self.alias, exc_info=True)
        self.segment_cache.close()  # what this process held may be evicted from now on
        with self._registry_lock:
            self._registry.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- searching -----------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, filters: dict[str, Any] | None = None,
               route_key: str | None = None) -> Hits:
        """The ``k`` best chunks for ``query`` with attribution, from one version.

        Args:
            route_key: what routes the request while the alias has a canary (a client or session id:
                the same key always gets the same version); None routes it at random.

        Returns:
            The hits; ``hits.version`` and ``hits.route`` say which version served them, ``hits.cache``
            whether a cache did.
        """
        version, route = self._route(route_key)
        return self._search_on(version, query, None, k, filters, route=route)

    def search_many(self, queries: Sequence[str], k: int = 10, filters: dict[str, Any] | None = None,
                    route_key: str | None = None) -> list[Hits]:
        """Search several queries on one version: one embedding batch and one HNSW call for all of them
        (hnswlib spreads it over its threads), then BM25, fusion and reranking per query. One
        ``route_key`` routes the whole batch."""
        return self.search_batch([Query(q, k, filters) for q in queries], route_key).hits

    def search_batch(self, queries: Sequence[Query], route_key: str | None = None,
                     route: str | None = None) -> BatchResult:
        """Search queries of their own k and filters on one version (the one ``route_key`` routes to
        when the call starts, whatever the alias does meanwhile): one embedding batch, one HNSW call at
        the depth the deepest query needs, then BM25, fusion and reranking per query.

        ``route`` (``live`` or ``canary``) names the version instead of a key: what a server passes
        for a micro-batch it grouped by :meth:`route` (a canary that ended meanwhile answers live)."""
        version, route = self._on_route(route) if route is not None else self._route(route_key)
        stages = {"embed": 0.0, "vector": 0.0, "rank": 0.0}
        if not queries:
            return BatchResult(self.alias, version.info.version, [], stages)
        started = time.perf_counter()
        vectors = self._embed([q.text for q in queries], version)
        stages["embed"] = time.perf_counter() - started
        started = time.perf_counter()
        n = min(max(self.config.candidates, max(q.k for q in queries)), version.size)
        knn = None
        if n:
            with telemetry.span("retrieval.vector_search", {"retrieval.candidates": n, "retrieval.queries": len(queries)}):
                try:
                    knn = version.knn_query(vectors, n, self.config.ef)
                except RuntimeError:  # a query got fewer than n neighbours: each one alone, exactly if need be
                    logger.info("HNSW returned fewer than %d neighbours for a query of the batch", n)
        stages["vector"] = time.perf_counter() - started
        started = time.perf_counter()
        hits = []
        ef = self.config.ef or 0  # None (each segment's measured breadth): reuse only at the batch's depth
        for i, q in enumerate(queries):
            # hnswlib searches at breadth max(ef, depth): a shallower query searching at the same breadth
            # gets the first of the batch's neighbours; one searching narrower searches alone
            depth = min(max(self.config.candidates, q.k), version.size)
            own = None if knn is None or max(ef, depth) != max(ef, n) else (knn[0][i][:depth], knn[1][i][:depth])
            hits.append(self._search_on(version, q.text, vectors[i], q.k, dict(q.filters) if q.filters else None,
                                        own, route=route))
        stages["rank"] = time.perf_counter() - started
        return BatchResult(self.alias, version.info.version, hits, stages)

    def route(self, route_key: str | None) -> tuple[str, str]:
        """(version, ``live`` or ``canary``) a request with ``route_key`` goes to now: what a server
        groups a micro-batch by before one :meth:`search_many` per group (keys route deterministically;
        None draws at random, so give keyless requests their request id as the key)."""
        version, route = self._route(route_key)
        return version.info.version, route

    def _route(self, route_key: str | None) -> tuple[LoadedVersion, str]:
        rollout = self._rollout
        if rollout is not None and routes_to_canary(self.alias, rollout.version.info.version, rollout.percent,
                                                    route_key):
            return rollout.version, "canary"
        return self._current, "live"

    def _on_route(self, route: str) -> tuple[LoadedVersion, str]:
        if route not in ("live", "canary"):
            raise ValueError(f"route must be 'live' or 'canary', got {route!r}")
        rollout = self._rollout
        if route == "canary" and rollout is not None:
            return rollout.version, "canary"
        return self._current, "live"

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of each cache since the retriever opened: ``query`` (query vectors), ``result``
        (exact result lists) and, when on, ``semantic``."""
        names = {"embedding": "query", "result": "result", "semantic": "semantic"}
        return {names[name]: (c.hits, c.misses) for name, c in self.cache_counters().items()}

    def cache_counters(self) -> dict[str, CacheCounters]:
        """Hits, misses and entries of the query-embedding, exact result and semantic result caches."""
        out = {"embedding": self._query_cache.counters(), "result": self._result_cache.counters()}
        if self._semantic is not None:
            out["semantic"] = self._semantic.counters()
        return out

    def _search_on(
        self, version: LoadedVersion, query: str, vector: np.ndarray | None, k: int, filters: dict[str, Any] | None,
        knn: tuple[np.ndarray, np.ndarray] | None = None, route: str = "live",
    ) -> Hits:
        filters = normalized_filters(filters)
        # while chunks of the version still wait for their valid_from, results depend on the clock
        cacheable = version.all_visible_by(datetime.now(timezone.utc)) or (filters or {}).get("as_of") is not None
        filters_key = json.dumps(filters, sort_keys=True, default=str)
        key = (version.info.version, query, k, filters_key)
        cached = self._result_cache.get(key) if cacheable else None
        if cached is not None:
            return cached.served(route, "exact")
        started = time.perf_counter()
        semantic_key = (version.info.version, filters_key, k)
        with telemetry.span("retrieval.search", {
            "retrieval.index_version": version.info.version,
            "retrieval.index_updated_at": version.info.updated_at.isoformat() if version.info.updated_at else "",
            "retrieval.alias": self.alias,
            "retrieval.k": k,
        }) as root:
            if vector is None:
                vector = self._embed([query], version)[0]
            match = self._semantic.get(semantic_key, vector) if self._semantic is not None and cacheable else None
            if match is not None:
                return match.value.served(route, "semantic", match.similarity, match.query)  # type: ignore[no-any-return]
            hits = self._ranker.ranked(version, query, vector, k, filters, knn)
            hits.version = version.info.version
            for hit in hits:
                telemetry.event(root, "chunk_retrieved", {"doc_id": hit.doc_id, "chunk_id": hit.chunk_id,
                                                          "score": hit.score, "source": hit.source_uri})
        if cacheable:
            self._result_cache.put(key, hits)
            if self._semantic is not None:
                self._semantic.put(semantic_key, vector, query, hits)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._measure(version, route, query, hits, k, filters, elapsed_ms)
        return hits.served(route)



__all__ = ["ENV_FIELDS", "Hits", "MirrorStats", "RetrievalConfig", "Retriever"]

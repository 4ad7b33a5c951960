"""The retriever's configuration and what a search returns (the hits and how they were served)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from retrieval.caches import DEFAULT_SEMANTIC_COSINE
from retrieval.segments.cache import DEFAULT_CACHE_BYTES


@dataclass(frozen=True)
class RetrievalConfig:
    """How the retriever searches. Every field can be passed to :meth:`Retriever.open`.

    Attributes:
        retrievers: ``hybrid`` (BM25 and HNSW), ``bm25`` or ``vector`` alone.
        candidates: how many candidates each of BM25 and HNSW returns (N).
        ef: HNSW search breadth; None (default) serves the breadth validation measured for each segment
            (whole-copy versions: 100); a search for n > ef neighbours searches at breadth n (max(ef, k)).
        fusion: ``rrf`` (reciprocal rank fusion) or ``weighted`` (min-max normalized scores).
        rrf_k: the k of reciprocal rank fusion.
        vector_weight: weight of the vector list in weighted fusion (BM25 gets the rest).
        reranker: ``exact`` (default), ``none``, ``exact:W``, or a cross-encoder name or path.
        rerank_depth: how many fused candidates the reranker rescores.
        model: the query encoder's model; None uses the model the version's manifest names.
        encoder_backend: ``auto`` (ONNX Runtime when the model allows it, else torch), ``onnx``, ``torch``.
        device: the torch encoder's device.
        query_cache_size / result_cache_size: LRU sizes (0 turns a cache off).
        follow: follow the alias (LISTEN/NOTIFY plus a poll every ``poll_interval`` seconds).
        mirror_fraction: share of queries also run against the alias's shadow version.
        mirror_window: how many of the latest mirrored queries the latency medians cover.
        semantic_cache_size: queries the semantic result cache keeps per (version, filters, k); 0 turns it off.
        semantic_cache_cosine: least cosine between a query and a cached one for the cached hits to be served.
        semantic_cache_keys: how many (version, filters, k) combinations the semantic cache keeps.
        warm_seconds: how long a version that stopped serving stays loaded, for an instant move back.
        canary_compare_fraction: share of canary-served queries also run on the live version (overlap@10).
        stats_interval: seconds between writes of serving statistics to the registry (while a canary
            or shadow is served); 0 writes none.
        segment_cache_bytes: the bound of the local cache of remote versions' segments
            (``HOME/cache/segment-cache``); over it, segments no loaded version uses are evicted.
        artifacts: the artifact store to read versions from (``s3://bucket/prefix``, ``gs://...``, a
            directory): version V of index I is read from ``ARTIFACTS/I/V``. None (default): from
            the URI the registry records for each version. For a replica of the store nearer the
            retriever, or one the indexer wrote under another name.
    """

    retrievers: str = "hybrid"
    candidates: int = 50
    ef: int | None = None
    fusion: str = "rrf"
    rrf_k: int = 60
    vector_weight: float = 0.7
    reranker: str | None = "exact"
    rerank_depth: int = 50
    model: str | None = None
    encoder_backend: str = "auto"
    device: str = "cpu"
    query_cache_size: int = 1024
    result_cache_size: int = 1024
    follow: bool = True
    poll_interval: float = 5.0
    mirror_fraction: float = 0.0
    mirror_window: int = 1000
    semantic_cache_size: int = 0
    semantic_cache_cosine: float = DEFAULT_SEMANTIC_COSINE
    semantic_cache_keys: int = 64
    warm_seconds: float = 300.0
    canary_compare_fraction: float = 0.1
    stats_interval: float = 5.0
    segment_cache_bytes: int = DEFAULT_CACHE_BYTES
    artifacts: str | None = None

    @classmethod
    def from_env(cls, **given: Any) -> "RetrievalConfig":
        """The fields given, else the ``RAGPIPE_<FIELD>`` environment variables of the fields in
        :data:`ENV_FIELDS`, else the defaults.

        Raises:
            ValueError: an environment variable does not parse as its field's type (named).
        """
        types = {f.name: f.type for f in fields(cls)}
        for name in ENV_FIELDS:
            raw = os.environ.get(f"RAGPIPE_{name.upper()}")
            if name in given or raw is None or raw == "":
                continue
            try:
                given[name] = int(raw) if types[name] == "int" else float(raw)
            except ValueError:
                raise ValueError(f"RAGPIPE_{name.upper()}={raw!r} is not a number") from None
        return cls(**given)

    def __post_init__(self) -> None:
        if self.encoder_backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"encoder_backend must be 'auto', 'onnx' or 'torch', got {self.encoder_backend!r}")
        if self.retrievers not in ("hybrid", "bm25", "vector"):
            raise ValueError(f"retrievers must be 'hybrid', 'bm25' or 'vector', got {self.retrievers!r}")
        if self.fusion not in ("rrf", "weighted"):
            raise ValueError(f"fusion must be 'rrf' or 'weighted', got {self.fusion!r}")
        if self.candidates < 1 or self.rerank_depth < 1:
            raise ValueError("candidates and rerank_depth must be positive")
        if not 0.0 <= self.mirror_fraction <= 1.0:
            raise ValueError(f"mirror_fraction must be within [0, 1], got {self.mirror_fraction}")
        if self.mirror_window < 1:
            raise ValueError(f"mirror_window must be positive, got {self.mirror_window}")
        if not -1.0 <= self.semantic_cache_cosine <= 1.0:
            raise ValueError(f"semantic_cache_cosine must be within [-1, 1], got {self.semantic_cache_cosine}")
        if not 0.0 <= self.canary_compare_fraction <= 1.0:
            raise ValueError(f"canary_compare_fraction must be within [0, 1], got {self.canary_compare_fraction}")
        if self.warm_seconds < 0 or self.stats_interval < 0 or self.segment_cache_bytes < 0:
            raise ValueError("warm_seconds, stats_interval and segment_cache_bytes must not be negative")


# read from RAGPIPE_SEMANTIC_CACHE_SIZE, ... by RetrievalConfig.from_env (Retriever.open)
ENV_FIELDS = ("semantic_cache_size", "semantic_cache_cosine", "warm_seconds", "canary_compare_fraction",
              "stats_interval", "segment_cache_bytes")


class Hits(list):  # type: ignore[type-arg]
    """The hits of one query, and how they were served.

    Attributes:
        exhausted: filters left fewer than k hits in the whole version.
        version: the version that served them (the live one or the alias's canary).
        route: ``live`` or ``canary``.
        cache: ``exact`` (the same query was answered before), ``semantic`` (a query within the
            semantic cache's cosine was), or None (searched now).
        similarity: for a semantic cache hit, the cosine between this query and the cached one.
        cached_query: for a semantic cache hit, the query whose hits these are.
    """

    exhausted: bool = False
    version: str | None = None
    route: str = "live"
    cache: str | None = None
    similarity: float | None = None
    cached_query: str | None = None

    def served(self, route: str, cache: str | None = None, similarity: float | None = None,
               cached_query: str | None = None) -> "Hits":
        """A copy marked with how it was served (cached lists are shared, never marked in place)."""
        out = Hits(self)
        out.exhausted, out.version, out.route = self.exhausted, self.version, route
        out.cache, out.similarity, out.cached_query = cache, similarity, cached_query
        return out


__all__ = ["ENV_FIELDS", "Hits", "RetrievalConfig"]

"""Ranking one query on one version: HNSW and BM25 candidates, fusion, filters, reranking, Hits.

    vector ─► HNSW top-N ─┐
    query  ─► BM25 top-N ─┴─► fuse ─► filter ─► rerank ─► top-k Hits (deeper when filters leave too few)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from retrieval import telemetry
from retrieval.artifacts import PAGE_COLUMNS
from retrieval.config import Hits, RetrievalConfig
from retrieval.fusion import reciprocal_rank_fusion, weighted_fusion
from retrieval.hit import Hit, StageScore
from retrieval.loaded import LoadedVersion  # or retrieval.segmented.SegmentedLoaded: the same interface
from retrieval.rerank import Reranker


HIT_COLUMNS = ("doc_id", "chunk_id", "text", "source_uri", "heading_path", "char_start", "char_end", "ordinal",
               "chunk_hash", *PAGE_COLUMNS)


class Ranker:
    """Ranks queries on loaded versions by a retriever's configuration; stateless, thread-safe."""

    def __init__(self, config: RetrievalConfig, reranker: Reranker | None, alias: str) -> None:
        self.config = config
        self._reranker = reranker
        self.alias = alias

    def ranked(self, version: LoadedVersion, query: str, vector: np.ndarray, k: int,
               filters: dict[str, Any] | None, knn: tuple[np.ndarray, np.ndarray] | None = None) -> Hits:
        """The top ``k`` hits of ``query`` (embedded as ``vector``) on ``version``."""
        return self._ranked(version, query, vector, k, filters, knn)

    def _ranked(self, version: LoadedVersion, query: str, vector: np.ndarray, k: int,
                filters: dict[str, Any] | None, knn: tuple[np.ndarray, np.ndarray] | None = None) -> Hits:
        n = max(self.config.candidates, k)
        while True:
            hits, exhausted = self._ranked_once(version, query, vector, k, filters, n, knn)
            knn = None  # computed for the first depth only
            if len(hits) >= k or exhausted:
                result = Hits(hits[:k])
                result.exhausted = len(hits) < k
                return result
            n *= 4  # filters removed too many candidates: look deeper

    def _ranked_once(self, version: LoadedVersion, query: str, vector: np.ndarray, k: int,
                     filters: dict[str, Any] | None, n: int,
                     knn: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[Hit], bool]:
        n = min(n, version.size)
        exhausted = n >= version.size
        if n == 0:
            return [], True
        if knn is not None and len(knn[0]) == n:
            labels, distances = knn
        else:
            with telemetry.span("retrieval.vector_search", {"retrieval.candidates": n}):
                labels, distances = version.vector_search(vector, n, self.config.ef)
        vec_keys = [int(x) for x in labels]
        vec_scores = {key: 1.0 - float(d) for key, d in zip(vec_keys, distances)}
        with telemetry.span("retrieval.bm25_search", {"retrieval.candidates": n}):
            bm_keys_arr, bm_scores_arr, all_bm25 = version.bm25.top(query, n)
            bm_keys = [int(x) for x in bm_keys_arr]
            bm_scores = dict(zip(bm_keys, bm_scores_arr.tolist()))
        if self.config.retrievers == "bm25":
            vec_keys, vec_scores = [], {}
        elif self.config.retrievers == "vector":
            bm_keys, bm_scores = [], {}
        with telemetry.span("retrieval.fusion", {"retrieval.fusion": self.config.fusion}):
            if self.config.fusion == "rrf":
                fused = reciprocal_rank_fusion([vec_keys, bm_keys], self.config.rrf_k)
            else:
                w = self.config.vector_weight
                fused = weighted_fusion([(vec_scores, w), (bm_scores, 1.0 - w)])
            order = sorted(fused, key=lambda key: (-fused[key], key))
        order = [key for key in order if self._passes(version, key, filters)]
        rerank_scores: dict[int, float] = {}
        if self._reranker is not None and order:
            depth = order[: max(self.config.rerank_depth, k)]
            with telemetry.span("retrieval.rerank", {"retrieval.reranker": self._reranker.name, "retrieval.depth": len(depth)}):
                rerank_scores = self._reranker.rerank(query, vector, depth, version, all_bm25)
            order = sorted(depth, key=lambda key: (-rerank_scores[key], key)) + order[len(depth):]
        vec_rank = {key: i for i, key in enumerate(vec_keys, start=1)}
        bm_rank = {key: i for i, key in enumerate(bm_keys, start=1)}
        fused_rank = {key: i for i, key in enumerate(sorted(fused, key=lambda x: (-fused[x], x)), start=1)}
        rerank_rank = {key: i for i, key in enumerate(sorted(rerank_scores, key=lambda x: (-rerank_scores[x], x)), start=1)}
        hits = [
            self._hit(version, key,
                      StageScore(bm_scores.get(key), bm_rank.get(key)),
                      StageScore(vec_scores.get(key), vec_rank.get(key)),
                      StageScore(fused.get(key), fused_rank.get(key)),
                      StageScore(rerank_scores.get(key), rerank_rank.get(key)))
            for key in order[:k]
        ]
        return hits, exhausted

    def _passes(self, version: LoadedVersion, key: int, filters: dict[str, Any] | None) -> bool:
        now = (filters or {}).get("as_of") or datetime.now(timezone.utc)
        visible = version.all_visible_by(now)
        if visible and not filters:
            return True  # the common case: nothing to read
        row = version.row[key]
        if not visible:
            valid_from = version.columns["valid_from"][row]
            if valid_from is not None and valid_from > now:
                return False  # staged: not visible yet
        if not filters:
            return True
        prefix = filters.get("doc_id_prefix")
        if prefix and not version.columns["doc_id"][row].startswith(prefix):
            return False
        wanted = filters.get("metadata") or {}
        if wanted:
            meta = version.metadata(row)
            for name, value in wanted.items():
                have = meta.get(name)
                if isinstance(value, (list, tuple, set, frozenset)):
                    if have not in value:
                        return False
                elif have != value:
                    return False
        return True

    def _hit(self, version: LoadedVersion, key: int, bm25: StageScore, vector: StageScore, fused: StageScore,
             rerank: StageScore) -> Hit:
        row = version.row[key]
        c = version.fields(row, HIT_COLUMNS)
        return Hit(
            doc_id=c["doc_id"], chunk_id=c["chunk_id"], text=c["text"],
            source_uri=c["source_uri"], heading_path=tuple(c["heading_path"]),
            char_start=c["char_start"], char_end=c["char_end"], ordinal=c["ordinal"],
            chunk_hash=c["chunk_hash"], index_version=version.info.version, alias=self.alias,
            version_updated_at=version.info.updated_at, model_id=version.info.model_id,
            bm25=bm25, vector=vector, fused=fused, rerank=rerank, metadata=version.metadata(row),
            **{name: c[name] for name in PAGE_COLUMNS},
        )


def normalized_filters(filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Filters with ``as_of`` as an aware datetime (ISO strings accepted, naive times are UTC)."""
    if not filters or filters.get("as_of") is None:
        return filters
    as_of = filters["as_of"]
    if isinstance(as_of, str):
        as_of = datetime.fromisoformat(as_of)
    if not isinstance(as_of, datetime):
        raise ValueError(f"filters['as_of'] must be a datetime or an ISO 8601 string, got {as_of!r}")
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    return {**filters, "as_of": as_of}


__all__ = ["Ranker", "normalized_filters"]

"""Helpers for the segment tests: write chunks as segments, lay them out in versions, read the oracles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.deterministic import DeterministicEmbedder, synthetic_chunk_table
from pipeline.segments.writer import SegmentParams, SegmentWriter
from retrieval.bm25 import ANALYZER_VERSION, B, K1
from retrieval.segments import SegmentPool, SegmentRef, SegmentStore, SegmentedVersion, VersionManifest

BM25_CORPUS = Path(__file__).parent / "data" / "bm25_corpus.jsonl"
DIM = 64
MODEL = f"deterministic-hashing-{DIM}"


def builtin_texts() -> list[str]:
    return [json.loads(line)["text"] for line in BM25_CORPUS.read_text(encoding="utf-8").splitlines()]


_EMBEDDER: list[DeterministicEmbedder] = []


def embed(texts: Sequence[str]) -> np.ndarray:
    if not _EMBEDDER:
        _EMBEDDER.append(DeterministicEmbedder(dim=DIM))
    return _EMBEDDER[0].embed(list(texts))


def params(exact_below: int = 0) -> SegmentParams:
    return SegmentParams(model_id=MODEL, dim=DIM, hnsw_m=16, hnsw_ef_construction=100, exact_below=exact_below)


def write_segment(store: SegmentStore, keys: Sequence[int], texts: Sequence[str], vectors: np.ndarray | None = None,
                  *, batch: int = 64, recall_target: float | None = None, exact: bool = False) -> SegmentRef:
    """One segment of ``texts`` under ``keys``, streamed in batches of ``batch`` chunks (``exact``:
    without a graph, searched exactly)."""
    vectors = embed(texts) if vectors is None else vectors
    with SegmentWriter(store, params(len(keys) + 1 if exact else 0), expected_rows=len(keys)) as writer:
        for at in range(0, len(keys), batch):
            writer.add(synthetic_chunk_table(list(keys[at:at + batch]), list(texts[at:at + batch])),
                       vectors[at:at + batch])
        manifest = writer.finish(recall_target=recall_target)
    return SegmentRef(manifest.name, manifest.rows)


def version_manifest(refs: Sequence[SegmentRef], version: str = "v1") -> VersionManifest:
    return VersionManifest(index="docs", version=version, model_id=MODEL, dim=DIM, metric="ip",
                           analyzer=ANALYZER_VERSION, k1=K1, b=B, hnsw_m=16, hnsw_ef_construction=100,
                           segments=tuple(refs))


def open_version(store: SegmentStore, refs: Sequence[SegmentRef], version: str = "v1",
                 pool: SegmentPool | None = None) -> SegmentedVersion:
    manifest = version_manifest(refs, version)
    store.write_version(manifest)
    return SegmentedVersion(store.read_version(version), pool or SegmentPool(store))


def delete(store: SegmentStore, pool: SegmentPool, ref: SegmentRef, keys: Sequence[int]) -> SegmentRef:
    return store.with_deletions(ref, np.asarray(keys, dtype=np.int64), pool.get(ref.name).sorted_keys)


def split_layout(store: SegmentStore, keys: Sequence[int], texts: Sequence[str], vectors: np.ndarray,
                 parts: int, stale: dict[int, str], pool: SegmentPool) -> list[SegmentRef]:
    """``keys`` spread over ``parts`` segments round-robin, plus a stale chunk per entry of ``stale``
    (extra key -> text) written into the segments and deleted again: the same live chunks as one
    segment of ``keys``, laid out with deletions."""
    refs = []
    extra = sorted(stale)
    extra_vectors = embed([stale[k] for k in extra]) if extra else np.zeros((0, DIM), np.float32)
    for p in range(parts):
        mine = list(range(p, len(keys), parts))
        mine_extra = list(range(p, len(extra), parts))
        seg_keys = [keys[i] for i in mine] + [extra[i] for i in mine_extra]
        seg_texts = [texts[i] for i in mine] + [stale[extra[i]] for i in mine_extra]
        seg_vectors = np.concatenate([vectors[mine], extra_vectors[mine_extra]])
        order = np.random.default_rng(p).permutation(len(seg_keys))  # rows not in key order
        ref = write_segment(store, [seg_keys[i] for i in order], [seg_texts[i] for i in order], seg_vectors[order],
                            batch=17, recall_target=0.99)
        gone = [extra[i] for i in mine_extra]
        refs.append(delete(store, pool, ref, gone) if gone else ref)
    return refs


def exact_top(vectors: np.ndarray, keys: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact inner-product top-k keys and the k-th best score."""
    scores = vectors @ query
    order = np.lexsort((keys, -scores))[:k]
    return keys[order], float(scores[order[-1]])


def recall_at(version: SegmentedVersion, vectors: np.ndarray, keys: np.ndarray, queries: np.ndarray, k: int = 10,
              **knn) -> float:
    """Tie-aware recall@k of the version's vector search against exact search over ``vectors``."""
    hits = 0
    for q in queries:
        _, kth = exact_top(vectors, keys, q, k)
        found, dist = version.knn(q, k, **knn)
        hits += int(((1.0 - dist) >= kth - 1e-5).sum())
    return hits / (len(queries) * k)

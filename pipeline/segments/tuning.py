"""Search breadth by measurement: the smallest HNSW ef whose recall@10 reaches the target on a segment's own vectors.

Recall at a given ef depends on the segment's size and its vectors (hashed bag-of-words vectors
need far more breadth than sentence embeddings at the same size), so a fixed ef is either wasted on
small segments or short on large ones. The segment writer measures it once, on a sample of the
segment's vectors as queries, against exact inner-product search (tie-aware, as validation counts:
a returned chunk counts when its exact score reaches the k-th best), and records it in the segment
manifest; searches use it unless the caller asks for another breadth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.validation import RECALL_SAMPLE

EF_CANDIDATES = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# The least breadth an index build records: the queries it measures with are made of its own chunks'
# words, and a workload's queries (about things the index barely holds, too) are harder; measured on
# the scale benchmark's out-of-corpus queries, recall at the breadth measured alone fell below the
# former fixed breadth's. The build records the smallest breadth from here up that reaches the target.
SERVING_EF_FLOOR = 100


@dataclass(frozen=True)
class EfChoice:
    """The breadth chosen and what was measured on the way.

    Attributes:
        reached: whether ``recall`` reaches the target (else ``ef`` is the largest candidate).
        measured: (ef, recall@k) for every breadth tried, ascending.
    """

    ef: int
    recall: float
    reached: bool
    measured: tuple[tuple[int, float], ...]


def choose_ef(graph: Any, vectors: np.ndarray, keys: np.ndarray, target: float, *, k: int = 10,
              sample: int = RECALL_SAMPLE, candidates: Sequence[int] = EF_CANDIDATES, seed: int = 0,
              queries: np.ndarray | None = None) -> EfChoice:
    """The smallest of ``candidates`` at which ``graph``'s recall@k against exact search over
    ``vectors`` reaches ``target``.

    The queries are a sample of the vectors themselves; each query's own chunk is left out of both
    its exact and its graph neighbours (it would be found at distance 0, an easy tenth of every
    answer), so the recall measured is that of the query's k nearest other chunks.

    Short queries are harder for a graph than chunk texts (their vectors lie between the chunks'),
    so where representative query vectors are at hand (a golden set's, recent queries') they give the
    truer measure: pass them as ``queries``, and they are searched as they are.

    Args:
        graph: an hnswlib index holding exactly ``vectors`` (inner-product space), labelled by ``keys``.
        sample: how many of the vectors serve as queries (all of them when fewer).
        queries: query vectors to measure with instead of a sample of ``vectors``.

    Returns:
        The choice; when no candidate reaches the target, the largest candidate with ``reached`` False.
    """
    rows = len(vectors)
    k = min(k, rows - 1 if queries is None else rows)
    if k <= 0:
        return EfChoice(int(min(candidates)), 1.0, True, ())
    if queries is None:
        picked = np.sort(np.random.default_rng(seed).choice(rows, size=min(sample, rows), replace=False))
        queries = np.asarray(vectors[picked], dtype=np.float32)
        own = np.asarray(keys)[picked]
    else:
        picked = np.full(len(queries), -1)
        queries = np.asarray(queries, dtype=np.float32)
        own = np.full(len(queries), -1)  # no query is a chunk of the segment: nothing to leave out
    kth = _exact_kth_scores(np.asarray(vectors, dtype=np.float32), queries, picked, k)
    measured = []
    for ef in sorted(candidates):
        extra = int((own >= 0).any())  # one more neighbour, the query's own chunk, left out below
        graph.set_ef(max(ef, k + extra))
        labels, distances = graph.knn_query(queries, k=k + extra)
        others = labels != own[:, None].astype(labels.dtype) if extra else np.ones(labels.shape, dtype=bool)
        if extra:
            others[others.all(axis=1), -1] = False  # the query's own chunk not found: drop the farthest
        scores = (1.0 - distances)[others].reshape(len(queries), k)
        recall = float((scores >= kth[:, None] - 1e-5).sum()) / (len(queries) * k)
        measured.append((ef, round(recall, 4)))
        if recall >= target:
            return EfChoice(ef, recall, True, tuple(measured))
    return EfChoice(measured[-1][0], measured[-1][1], False, tuple(measured))


def _exact_kth_scores(vectors: np.ndarray, queries: np.ndarray, own_rows: np.ndarray, k: int,
                      block: int = 65536) -> np.ndarray:
    """Each query's k-th best inner product over ``vectors`` other than its own row, in blocks of
    rows (bounded memory)."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), block):
        scores = queries @ vectors[start:start + block].T
        inside = (own_rows >= start) & (own_rows < start + scores.shape[1])
        scores[np.flatnonzero(inside), own_rows[inside] - start] = -np.inf
        both = np.concatenate([best, scores], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    return best.min(axis=1)

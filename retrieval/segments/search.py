"""Searching a version over its segments: per-segment HNSW minus the version's deletions, collection-wide BM25.

Results do not depend on how the chunks are laid out in segments:

- **BM25** scores use the version's collection statistics over its live chunks — their number, their
  mean length, and each term's document frequency summed over the segments minus the deleted
  chunks — so that every score equals rank-bm25's ``BM25Okapi`` over the live chunks (with the idf
  floor of :func:`retrieval.bm25.bm25_idf`), whatever the segments; ties are broken by chunk key.
- **Vectors**: each segment's graph returns its ``k`` nearest live chunks, and the nearest ``k`` of
  those win. The version's deletions are skipped inside the graph search (hnswlib's ``filter``),
  never marked on a graph that other versions share. A segment with too few live chunks for the
  graph to return ``k``, and a small segment written without a graph, are searched exactly over
  their stored vectors.

Each segment is opened once per process by a :class:`SegmentPool` and shared by every version that
lists it; a version adds only its deletion masks and its term statistics.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.bm25 import Analyzer, bm25_idf
from retrieval.errors import VersionCorrupt
from retrieval.fusion import reciprocal_rank_fusion
from retrieval.segments.files import term_hashes
from retrieval.segments.manifest import SegmentRef, SegmentStore, VersionManifest
from retrieval.segments.segment import Segment

DELETION_MODES = ("filter", "overfetch")
SPARSE_RATIO = 8  # BM25 sums over the rows with postings when they are under 1/8 of the segment's rows
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True)
class RowScores:
    """One segment's positive BM25 scores for a query: ``rows`` ascending, ``scores`` beside them."""

    rows: np.ndarray
    scores: np.ndarray

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The scores of ``rows`` (0 for a row without one)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros(len(rows), dtype=np.float64)
        if len(self.rows) and len(rows):
            at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
            hit = self.rows[at] == rows
            out[hit] = self.scores[at[hit]]
        return out


class SegmentPool:
    """Segments opened once per process and shared by the versions that list them; thread-safe.

    Also shared: a segment as seen through one deletion set (its live rows and its live BM25 term
    statistics), since the versions that follow one another mostly list the same segments with the
    same deletion sets: a version that adds a segment reads only that segment."""

    def __init__(self, store: SegmentStore, *, verify: bool = True) -> None:
        self.store = store
        self.verify = verify
        self._segments: dict[str, Segment] = {}
        self._views: dict[tuple[str, str | None], _Deletions] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Segment:
        with self._lock:
            segment = self._segments.get(name)
            if segment is None:
                segment = self._segments[name] = Segment(self.store.segment_path(name), verify=self.verify)
            return segment

    def view(self, ref: SegmentRef, where: str) -> _Deletions:
        """The segment ``ref`` names minus its deletion set (read once per pair).

        Raises:
            VersionCorrupt: the deletion file is damaged, or names a key the segment does not hold.
        """
        key = (ref.name, ref.deletions)
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = _Deletions.of(self.get(ref.name), self.store.read_deletions(ref), where)
            with self._lock:
                view = self._views.setdefault(key, view)
        return view

    def retain(self, names: Iterable[str], views: Iterable[tuple[str, str | None]] | None = None) -> None:
        """Drop every segment not in ``names`` (those no served version lists any more), and every
        deletion view not in ``views`` (None: only those of the dropped segments)."""
        keep = set(names)
        keep_views = set(views) if views is not None else None
        with self._lock:
            for name in [n for n in self._segments if n not in keep]:
                del self._segments[name]
            for key in [k for k in self._views
                        if k[0] not in keep or (keep_views is not None and k not in keep_views)]:
                del self._views[key]

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._segments)


@dataclass(frozen=True)
class _Deletions:
    """A segment minus one deletion set: which rows are live, and the BM25 statistics of those.

    Attributes:
        live: bool per row; None when nothing is deleted.
        df: each of the segment's terms' document frequency over its live rows.
        length: the live rows' total BM25 length.
    """

    deleted_keys: np.ndarray
    live: np.ndarray | None
    deleted_set: frozenset[int]
    df: np.ndarray
    length: int
    dead_rows: np.ndarray | None = None  # the deleted rows, ascending (None when nothing is deleted)

    @classmethod
    def of(cls, seg: Segment, deleted: np.ndarray, where: str) -> "_Deletions":
        df = np.asarray(seg.df, dtype=np.int64)
        length = seg.manifest.total_length
        live = None
        if len(deleted):
            rows = seg.rows_of(deleted)
            if (rows < 0).any():
                raise VersionCorrupt(f"{where}: deleted chunk key {int(deleted[rows < 0][0])} is not in the segment")
            live = np.ones(seg.rows, dtype=bool)
            live[rows] = False
            dead_rows = ~live
            length -= int(np.asarray(seg.doc_lengths)[dead_rows].sum())
            dead_postings = np.flatnonzero(dead_rows[np.asarray(seg.posting_rows)])
            terms_of = np.searchsorted(np.asarray(seg.offsets), dead_postings, side="right") - 1
            df = df - np.bincount(terms_of, minlength=len(df))
        dead = None if live is None else np.flatnonzero(~live)
        return cls(deleted, live, frozenset(deleted.tolist()), df, length, dead)


@dataclass
class _Part:
    """A segment as one version sees it: the segment and that version's deletions from it."""

    segment: Segment
    ref: SegmentRef
    view: _Deletions

    @property
    def deleted_keys(self) -> np.ndarray:
        return self.view.deleted_keys

    @property
    def live(self) -> np.ndarray | None:
        return self.view.live

    def accepts(self, label: int) -> bool:
        return label not in self.view.deleted_set


class SegmentedVersion:
    """A version ready to search: its segments (from a pool) and its deletions and BM25 statistics."""

    def __init__(self, manifest: VersionManifest, pool: SegmentPool, analyzer: Analyzer | None = None) -> None:
        """Raises:
            VersionCorrupt: a segment or deletion file is damaged, or a segment disagrees with the
                version manifest (model, dimension, metric, analyzer, rows, deleted keys).
        """
        self.manifest = manifest
        self.analyzer = analyzer or Analyzer()
        self.parts = [self._part(ref, pool) for ref in manifest.segments]
        self.size = manifest.chunks
        self.k1, self.b = manifest.k1, manifest.b
        self._collection_statistics()

    def _part(self, ref: SegmentRef, pool: SegmentPool) -> _Part:
        segment = pool.get(ref.name)
        m, v = segment.manifest, self.manifest
        where = f"version {v.version}: segment {ref.name}"
        for what, theirs, ours in [("model", m.model_id, v.model_id), ("dimension", m.dim, v.dim),
                                   ("metric", m.metric, v.metric), ("analyzer", m.analyzer, v.analyzer),
                                   ("rows", m.rows, ref.rows)]:
            if theirs != ours:
                raise VersionCorrupt(f"{where} has {what} {theirs!r}, the version manifest says {ours!r}")
        return _Part(segment, ref, pool.view(ref, where))

    def _collection_statistics(self) -> None:
        """N, the mean length and every term's live document frequency over the version's chunks."""
        total_length = sum(part.view.length for part in self.parts)
        self.avgdl = total_length / self.size if self.size else 0.0
        hashes = [np.asarray(part.segment.term_hashes) for part in self.parts]
        all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        self.term_hashes, inverse = np.unique(all_hashes, return_inverse=True)
        dfs = [part.view.df for part in self.parts]
        df_live = np.bincount(inverse.ravel(), weights=np.concatenate(dfs) if dfs else None,
                              minlength=len(self.term_hashes)).astype(np.int64)
        self.df = df_live
        self.idf = bm25_idf(df_live, self.size)

    # -- BM25 -----------------------------------------------------------------------------------------

    def _query_terms(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(term hashes, idfs) of the analyzed query terms found among the live chunks, repeats kept."""
        hashes = term_hashes(self.analyzer.terms(query))
        if not len(self.term_hashes) or not len(hashes):
            return hashes[:0], np.zeros(0)
        at = np.minimum(np.searchsorted(self.term_hashes, hashes), len(self.term_hashes) - 1)
        found = (self.term_hashes[at] == hashes) & (self.df[at] > 0)
        return hashes[found], self.idf[at[found]]

    def _part_scores(self, part: _Part, terms: tuple[np.ndarray, np.ndarray]) -> RowScores:
        """The BM25 scores of the part's live rows that have one (a positive score), rows ascending.

        Each row's score adds its terms' contributions in query order, whatever the layout, so equal
        chunk sets give equal floating-point scores. Rows with postings are few for most queries:
        their scores are summed over those rows alone (the sums in the same order as over every
        row); a query whose terms reach many rows is summed over every row."""
        seg = part.segment
        which, rows, tfs = seg.postings(terms[0])
        if not len(rows):
            return RowScores(_NO_ROWS, _NO_SCORES)
        tf = tfs.astype(np.float64)
        length = seg.doc_lengths[rows].astype(np.float64)
        k1, b = self.k1, self.b
        weights = terms[1][which] * (tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / self.avgdl)))
        if len(rows) * SPARSE_RATIO < seg.rows:
            touched, inverse = np.unique(rows, return_inverse=True)
            scores = np.bincount(inverse.ravel(), weights=weights, minlength=len(touched))
        else:
            dense = np.bincount(rows, weights=weights, minlength=seg.rows)
            touched = np.flatnonzero(dense > 0)
            scores = dense[touched]
        keep = scores > 0
        if part.live is not None:
            keep &= part.live[touched]
        return RowScores(touched[keep].astype(np.int64), scores[keep])

    def bm25_all(self, query: str) -> list[RowScores]:
        """The BM25 scores of every segment's live rows with a positive score, one per segment."""
        terms = self._query_terms(query)
        if not len(terms[0]):
            return [RowScores(_NO_ROWS, _NO_SCORES) for _ in self.parts]
        return [self._part_scores(part, terms) for part in self.parts]

    def bm25_top(self, query: str, n: int, all_scores: list[RowScores] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chunk keys, scores) of the ``n`` best live chunks with a positive BM25 score, best first,
        ties by ascending key (``all_scores``: what :meth:`bm25_all` returned for the query)."""
        scores_of = all_scores if all_scores is not None else self.bm25_all(query)
        keys, scores = [], []
        for part, s in zip(self.parts, scores_of):
            rows, values = s.rows, s.scores
            if len(rows) > n:  # the n best, and every chunk tied with the n-th: ties go by key across segments
                nth = -np.partition(-values, n - 1)[n - 1]
                best = values >= nth
                rows, values = rows[best], values[best]
            keys.append(part.segment.keys[rows])
            scores.append(values)
        return _best(keys, scores, n, descending=True)

    def bm25_scores(self, query: str, keys: Sequence[int]) -> np.ndarray:
        """BM25 scores of the live chunks ``keys`` (0 for a key not among them)."""
        terms = self._query_terms(query)
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(len(keys), dtype=np.float64)
        if not len(terms[0]):
            return out
        for part in self.parts:
            rows = part.segment.rows_of(keys)
            found = rows >= 0
            if found.any():
                out[found] = self._part_scores(part, terms).at(rows[found])
        return out

    # -- vectors --------------------------------------------------------------------------------------

    def knn(self, vector: np.ndarray, k: int, ef: int | None = None,
            deletions: str = "filter") -> tuple[np.ndarray, np.ndarray]:
        """(chunk keys, distances) of the ``k`` nearest live chunks, nearest first (ties by key).

        Args:
            ef: search breadth in every segment; None: each segment's measured breadth (the
                version manifest's, else the segment manifest's).
            deletions: how a segment's deleted chunks are skipped: ``filter`` inside the graph search
                (hnswlib's filter callable), or ``overfetch`` (ask for enough more neighbours, drop
                the deleted ones, search again filtered if too few remain).
        """
        if deletions not in DELETION_MODES:
            raise ValueError(f"deletions must be one of {DELETION_MODES}, got {deletions!r}")
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        keys, distances = [], []
        for part in self.parts:
            found = self._part_knn(part, vector, k, ef, deletions)
            keys.append(found[0])
            distances.append(found[1])
        return _best(keys, distances, k, descending=False)

    def _part_knn(self, part: _Part, vector: np.ndarray, k: int, ef: int | None,
                  deletions: str) -> tuple[np.ndarray, np.ndarray]:
        seg, live = part.segment, part.ref.live
        ef = ef if ef is not None else part.ref.ef  # None still: the segment manifest's breadth
        k = min(k, live)
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if seg.graph is None:  # a small segment: searched exactly
            return self._exact(part, vector[0], k)
        try:
            if part.live is None:
                labels, dist = seg.knn(vector, k, ef)
            elif deletions == "overfetch":
                fetch = min(seg.rows, math.ceil(k * seg.rows / live * 1.05) + 2)
                labels, dist = seg.knn(vector, fetch, ef)
                keep = ~np.isin(labels[0].astype(np.int64), part.deleted_keys)
                if int(keep.sum()) < k:
                    labels, dist = seg.knn(vector, k, ef, filter=part.accepts)
                else:
                    labels, dist = labels[:, keep][:, :k], dist[:, keep][:, :k]
            else:
                labels, dist = seg.knn(vector, k, ef, filter=part.accepts)
            return labels[0].astype(np.int64), dist[0]
        except RuntimeError:  # the graph found fewer than k live neighbours: search exactly
            return self._exact(part, vector[0], k)

    def _exact(self, part: _Part, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest live chunks of the segment by brute force (ties by key): one product over
        the mapped vectors, the deleted rows set aside, a partial sort."""
        seg = part.segment
        matrix = seg.vectors
        if self.manifest.metric == "l2":
            dist = ((matrix - vector) ** 2).sum(axis=1)
        else:  # ip, cosine: hnswlib's distance 1 - <q, v> (vectors are L2-normalized)
            dist = 1.0 - matrix @ vector
        dist = np.asarray(dist, dtype=np.float32)
        if part.view.dead_rows is not None:
            dist[part.view.dead_rows] = np.inf
        k = min(k, part.ref.live)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if k < len(dist):  # every row tied with the k-th too, so that ties go by key
            kth = np.partition(dist, k - 1)[k - 1]
            rows = np.flatnonzero(dist <= kth)
        else:
            rows = np.arange(len(dist))
        rows = rows[np.isfinite(dist[rows])]
        order = rows[np.lexsort((seg.keys[rows], dist[rows]))][:k]
        return seg.keys[order].astype(np.int64), dist[order]

    # -- hybrid and chunks ----------------------------------------------------------------------------

    def hybrid(self, query: str, vector: np.ndarray, k: int = 10, candidates: int = 50, rrf_k: int = 60,
               ef: int | None = None) -> list[tuple[int, float]]:
        """(chunk key, fused score) of the ``k`` best chunks: BM25 top-``candidates`` and vector
        top-``candidates`` fused by reciprocal rank."""
        vec_keys, _ = self.knn(vector, candidates, ef)
        bm_keys, _ = self.bm25_top(query, candidates)
        fused = reciprocal_rank_fusion([vec_keys.tolist(), bm_keys.tolist()], rrf_k)
        return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]

    def chunk(self, key: int) -> dict[str, Any]:
        """The chunk table row of the live chunk ``key``.

        Raises:
            KeyError: the key is not a live chunk of this version.
        """
        for part in self.parts:
            row = int(part.segment.rows_of(np.array([key]))[0])
            if row >= 0 and (part.live is None or part.live[row]):
                return part.segment.chunk(row)
        raise KeyError(key)

    def live_keys(self) -> np.ndarray:
        """Every live chunk key of the version, ascending."""
        keys = [p.segment.keys if p.live is None else p.segment.keys[p.live] for p in self.parts]
        return np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)

    def vectors_of(self, keys: Sequence[int]) -> np.ndarray:
        """Full-precision vectors of live chunks, in the order of ``keys`` (read by position, see
        :meth:`Segment.stored_vectors`)."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.full((len(keys), self.manifest.dim), np.nan, dtype=np.float32)
        for part in self.parts:
            rows = part.segment.rows_of(keys)
            if part.live is not None:
                rows = np.where(rows >= 0, np.where(part.live[np.maximum(rows, 0)], rows, -1), -1)
            found = rows >= 0
            if found.any():
                out[found] = part.segment.stored_vectors(rows[found])
        if np.isnan(out[:, 0]).any():
            raise KeyError(int(keys[np.isnan(out[:, 0])][0]))
        return out


def _best(keys: list[np.ndarray], values: list[np.ndarray], n: int, *, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best of per-segment candidates: by value (highest first when ``descending``), then key."""
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    all_keys = np.concatenate(keys).astype(np.int64)
    all_values = np.concatenate(values)
    order = np.lexsort((all_keys, -all_values if descending else all_values))[:n]
    return all_keys[order], all_values[order]

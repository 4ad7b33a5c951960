"""The retriever's caches: exact LRUs (query text → vector, query → hits) and the semantic result cache.

query ─► embed (exact cache) ─► semantic cache: nearest cached query of the same (version, filters, k)
                                 within the configured cosine ─► its hits, marked ``cache="semantic"``

The semantic cache keeps, per (version, filters, k, ...) key, a bounded numpy matrix of the cached
queries' unit vectors beside their hits, so the nearest cached query is one matrix-vector product.
Every cache counts its hits and misses (:class:`CacheCounters`) for metrics. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Measured with `python -m benchmarks agent_cache` (docs/benchmarks.md, all-MiniLM-L6-v2): the lowest
# cosine at which fewer than 1% of semantic hits answer with another real query's results and their
# mean overlap@10 with the uncached results is at least 0.9.
DEFAULT_SEMANTIC_COSINE = 0.95


@dataclass(frozen=True)
class CacheCounters:
    """Hits, misses and current entries of one cache (for /metrics)."""

    hits: int
    misses: int
    entries: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class LRUCache:
    """A bounded least-recently-used map, thread-safe, counting hits and misses (size 0: off)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self._misses += 1
            else:
                self._hits += 1
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def counters(self) -> CacheCounters:
        with self._lock:
            return CacheCounters(self._hits, self._misses, len(self._data))


@dataclass(frozen=True)
class SemanticMatch:
    """A cached result whose query lies within the cache's cosine of the one asked."""

    value: Any
    similarity: float
    query: str


class _Bucket:
    """The cached queries of one key: a preallocated (capacity × dim) matrix of unit vectors, filled
    round-robin (the oldest entry is replaced once full)."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.matrix = np.zeros((capacity, dim), dtype=np.float32)
        self.values: list[Any] = [None] * capacity
        self.queries: list[str] = [""] * capacity
        self.used = 0
        self.next = 0

    def nearest(self, unit: np.ndarray) -> tuple[int, float]:
        sims = self.matrix[: self.used] @ unit
        best = int(np.argmax(sims))
        return best, float(sims[best])

    def add(self, unit: np.ndarray, query: str, value: Any) -> None:
        slot = self.next
        self.matrix[slot], self.values[slot], self.queries[slot] = unit, value, query
        self.next = (slot + 1) % len(self.values)
        self.used = max(self.used, slot + 1)


class SemanticCache:
    """Results of earlier queries, returned for a new query whose embedding is close enough.

    Args:
        cosine: the least cosine similarity between the new query's vector and a cached one's for a hit.
        per_key: how many queries each key keeps (the oldest is replaced).
        keys: how many keys (version, filters, k, ...) are kept (least recently used dropped).
    """

    def __init__(self, cosine: float, per_key: int = 256, keys: int = 64) -> None:
        if not -1.0 <= cosine <= 1.0:
            raise ValueError(f"the semantic cache's cosine must be within [-1, 1], got {cosine}")
        if per_key < 1 or keys < 1:
            raise ValueError("the semantic cache's per_key and keys must be positive")
        self.cosine = cosine
        self.per_key = per_key
        self.keys = keys
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: Hashable, vector: np.ndarray) -> SemanticMatch | None:
        """The cached result nearest to ``vector`` under ``key`` if within the cosine, else None."""
        unit = _unit(vector)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.used and bucket.matrix.shape[1] == unit.shape[0]:
                self._buckets.move_to_end(key)
                best, similarity = bucket.nearest(unit)
                if similarity >= self.cosine:
                    self._hits += 1
                    return SemanticMatch(bucket.values[best], similarity, bucket.queries[best])
            self._misses += 1
            return None

    def put(self, key: Hashable, vector: np.ndarray, query: str, value: Any) -> None:
        unit = _unit(vector)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None or bucket.matrix.shape[1] != unit.shape[0]:
                bucket = self._buckets[key] = _Bucket(self.per_key, unit.shape[0])
            self._buckets.move_to_end(key)
            bucket.add(unit, query, value)
            while len(self._buckets) > self.keys:
                self._buckets.popitem(last=False)

    def retain_versions(self, versions: set[str]) -> None:
        """Drop every key whose first element (its version) is not in ``versions``."""
        with self._lock:
            for key in [key for key in self._buckets if _version_of(key) not in versions]:
                del self._buckets[key]

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()

    def counters(self) -> CacheCounters:
        with self._lock:
            return CacheCounters(self._hits, self._misses, sum(b.used for b in self._buckets.values()))


def _unit(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _version_of(key: Hashable) -> Any:
    return key[0] if isinstance(key, tuple) and key else key


__all__ = ["CacheCounters", "DEFAULT_SEMANTIC_COSINE", "LRUCache", "SemanticCache", "SemanticMatch"]

"""Serving a canary beside the live version: routing requests, and measuring both for the registry.

request ─► route key ─► stable hash ─► bucket in [0, 100) < canary percent? ─► canary : live
served ─► StatsRecorder (in memory) ─► every few seconds one batch to Postgres ─► guards judged

Routing is a pure function of (alias, canary version, route key): the same key (a client or
session id) always lands on the same side for one canary, and raising the percentage only adds
keys to the canary. A request without a key is routed at random, per request.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registry.rollout_stats import Guard, StatsDelta


@dataclass(frozen=True)
class Rollout:
    """The canary a retriever serves beside its live version (one immutable object, swapped whole)."""

    version: Any  # retrieval.loaded.LoadedVersion
    percent: float
    guards: tuple[Guard, ...] = ()


def route_bucket(alias: str, canary: str, route_key: str) -> float:
    """Where ``route_key`` falls in [0, 100) for this alias's canary (SHA-256, uniform)."""
    digest = hashlib.sha256(f"{alias}\x00{canary}\x00{route_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def routes_to_canary(alias: str, canary: str, percent: float, route_key: str | None) -> bool:
    """Whether a request goes to the canary: by the key's bucket, or at random without a key."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    bucket = random.random() * 100.0 if route_key is None else route_bucket(alias, canary, route_key)
    return bucket < percent


def overlap_at_10(served: Sequence[Any], reference: Sequence[Any]) -> float:
    """The share of ``reference``'s top 10 chunks that ``served``'s top 10 holds (1.0 when both are empty)."""
    mine = {h.chunk_id for h in served[:10]}
    theirs = {h.chunk_id for h in reference[:10]}
    if not theirs:
        return 1.0 if not mine else 0.0
    return len(mine & theirs) / len(theirs)


class StatsRecorder:
    """What this process served, per (alias, version, role), until :meth:`take` hands it to a writer.

    Recording is a dict update under a lock (the hot path never waits on the database); memory is
    bounded by the number of versions served, each a fixed-size histogram.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deltas: dict[tuple[str, str, str], StatsDelta] = {}

    def record(self, alias: str, version: str, role: str, latency_ms: float,
               overlap: float | None = None) -> None:
        key = (alias, version, role)
        with self._lock:
            delta = self._deltas.get(key)
            if delta is None:
                delta = self._deltas[key] = StatsDelta(alias, version, role)
            delta.record(latency_ms, overlap)

    def take(self) -> list[StatsDelta]:
        """Everything recorded since the last take (and forget it)."""
        with self._lock:
            deltas, self._deltas = list(self._deltas.values()), {}
        return deltas

    def give_back(self, deltas: Sequence[StatsDelta]) -> None:
        """Return deltas a failed write did not store, to be written with the next batch."""
        with self._lock:
            for d in deltas:
                mine = self._deltas.get((d.alias, d.version, d.role))
                if mine is None:
                    self._deltas[(d.alias, d.version, d.role)] = d
                    continue
                mine.queries += d.queries
                mine.compared += d.compared
                mine.overlap_sum += d.overlap_sum
                mine.latency_buckets = [a + b for a, b in zip(mine.latency_buckets, d.latency_buckets)]


class WarmVersions:
    """Versions served before, kept loaded for ``seconds`` after they stopped serving, so that moving
    back to one (rollback, abort, promote undone) switches at once without reading any file.

    Args:
        seconds: how long a version stays warm (0: not at all).
        clock: monotonic seconds (a parameter for tests of the expiry logic).
    """

    def __init__(self, seconds: float, clock: Any = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._versions: dict[str, tuple[Any, float]] = {}

    def keep(self, loaded: Any) -> None:
        """Keep ``loaded`` (a LoadedVersion) warm from now on."""
        if self.seconds > 0:
            with self._lock:
                self._versions[loaded.info.version] = (loaded, self._clock() + self.seconds)

    def take(self, version: str) -> Any:
        """The warm version named ``version`` (no longer warm: it serves again), or None."""
        with self._lock:
            found = self._versions.pop(version, None)
        return None if found is None else found[0]

    def expire(self) -> list[str]:
        """Let go of versions warm for longer than ``seconds``; returns their names."""
        now = self._clock()
        with self._lock:
            gone = [name for name, (_, until) in self._versions.items() if until <= now]
            for name in gone:
                del self._versions[name]
        return gone

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def versions(self) -> list[Any]:
        """The warm versions themselves."""
        with self._lock:
            return [loaded for loaded, _ in self._versions.values()]


class MirrorStats:
    """What mirroring queries to the shadow version has shown so far: bounded memory, thread-safe.

    ``queries`` and the mean overlap@10 are streaming aggregates over every mirrored query (a count
    and a sum); the latency medians are over a fixed-size window of the last ``window`` mirrored
    queries, since a median cannot be streamed exactly. Memory is O(window) however long the
    retriever serves. (What is written to the registry goes through :class:`StatsRecorder`.)
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"the mirror window must be positive, got {window}")
        self.window = window
        self._lock = threading.Lock()
        self._queries = 0
        self._overlap_sum = 0.0
        self._primary_ms: deque[float] = deque(maxlen=window)
        self._shadow_ms: deque[float] = deque(maxlen=window)

    @property
    def queries(self) -> int:
        return self._queries

    def record(self, overlap_at_10: float, primary_ms: float, shadow_ms: float) -> None:
        """Add one mirrored query: its overlap@10 and both versions' latencies."""
        with self._lock:
            self._queries += 1
            self._overlap_sum += overlap_at_10
            self._primary_ms.append(primary_ms)
            self._shadow_ms.append(shadow_ms)

    def summary(self) -> dict[str, float]:
        """``queries`` and ``mean_overlap_at_10`` over every mirrored query; ``primary_p50_ms`` and
        ``shadow_p50_ms`` over the last ``latency_window`` of them."""
        import numpy as np

        with self._lock:
            queries, overlap_sum = self._queries, self._overlap_sum
            primary, shadow = list(self._primary_ms), list(self._shadow_ms)
        if not queries:
            return {"queries": 0}
        return {
            "queries": queries,
            "mean_overlap_at_10": overlap_sum / queries,
            "primary_p50_ms": float(np.median(primary)),
            "shadow_p50_ms": float(np.median(shadow)),
            "latency_window": len(primary),
        }


__all__ = ["MirrorStats", "Rollout", "StatsRecorder", "WarmVersions", "overlap_at_10", "route_bucket",
           "routes_to_canary"]

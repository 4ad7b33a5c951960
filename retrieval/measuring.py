"""What a retriever measures while it serves a canary or a shadow, written to the registry in batches.

served query ─► latency by (version, role) ─┐
canary query ─► also on live: overlap@10 ───┼─► StatsRecorder ─► every stats_interval: one write
live query ──► mirrored to the shadow ──────┘        ─► the canary's guards judged on every process's writes
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from registry.rollout_stats import Guard, guard_breach
from retrieval.rollout import overlap_at_10

if TYPE_CHECKING:
    from registry import Registry
    from retrieval.config import Hits, RetrievalConfig
    from retrieval.loaded import LoadedVersion
    from retrieval.ranking import Ranker
    from retrieval.rollout import MirrorStats, Rollout, StatsRecorder

logger = logging.getLogger("retrieval.retriever")


class RolloutMeasuring:
    """Measuring and guarding a rollout; mixed into :class:`retrieval.retriever.Retriever`."""

    alias: str
    config: RetrievalConfig
    stats: StatsRecorder
    mirror: MirrorStats
    _registry: Registry
    _registry_lock: threading.Lock
    _closed: threading.Event
    _rollout: Rollout | None
    _current: LoadedVersion
    _shadow: LoadedVersion | None
    _ranker: Ranker

    if TYPE_CHECKING:
        def refresh(self) -> bool: ...
        def _embed(self, queries: list[str], version: LoadedVersion) -> np.ndarray: ...

    def _write_stats_every(self) -> None:
        while not self._closed.wait(self.config.stats_interval):
            try:
                self.write_stats()
            except Exception:  # the database is away: the deltas wait for the next write
                logger.warning("cannot write serving statistics of alias %s; retrying in %g s", self.alias,
                               self.config.stats_interval, exc_info=True)

    def write_stats(self) -> str | None:
        """Write what was measured since the last write (one batch), then judge the canary's guards
        on the statistics every process wrote; a breached guard aborts the canary (recorded with its
        reason, followed by every reader). Returns the abort's reason, or None.

        Runs every ``stats_interval`` seconds in a background thread; callable directly.
        """
        deltas = self.stats.take()
        try:
            with self._registry_lock:
                self._registry.record_version_stats(deltas)
        except BaseException:
            self.stats.give_back(deltas)
            raise
        if self._rollout is None:
            return None
        with self._registry_lock:
            canary = self._registry.read(self._registry.canary_of, self.alias)
            if canary is None or not canary.canary_guards:
                return None
            guards = [Guard.from_dict(g) for g in canary.canary_guards]
            reason = guard_breach(guards, self._registry.read(self._registry.canary_stats, canary),
                                  canary.canary_min_queries)
            if reason is None:
                return None
            moved = self._registry.abort_canary(self.alias, reason, version=canary.canary_version)
        if moved is not None:
            logger.warning("alias %s: %s; canary aborted", self.alias, reason)
            self.refresh()
        return reason

    def _measure(self, version: LoadedVersion, route: str, query: str, hits: Hits, k: int,
                 filters: dict[str, Any] | None, elapsed_ms: float) -> None:
        """Statistics of a searched (not cached) query while a canary or shadow is served: its latency
        by version and role; for a share of canary queries their overlap@10 with the live version;
        for a share of live queries the shadow's (mirroring)."""
        rollout = self._rollout
        if route == "canary":
            overlap = None
            if random.random() < self.config.canary_compare_fraction:
                compared = self._compare(self._current, query, hits, k, filters, reference_is_served=False)
                overlap = None if compared is None else compared[0]
            self.stats.record(self.alias, version.info.version, "canary", elapsed_ms, overlap)
            return
        shadow = self._shadow
        if rollout is not None or (self.config.mirror_fraction and shadow is not None):
            self.stats.record(self.alias, version.info.version, "live", elapsed_ms)  # what the others compare with
        if self.config.mirror_fraction and shadow is not None and random.random() < self.config.mirror_fraction:
            compared = self._compare(shadow, query, hits, k, filters, reference_is_served=True)
            if compared is not None:
                self.mirror.record(compared[0], elapsed_ms, compared[1])
                self.stats.record(self.alias, shadow.info.version, "shadow", compared[1], compared[0])

    def _compare(self, other: LoadedVersion, query: str, served: Hits, k: int, filters: dict[str, Any] | None,
                 reference_is_served: bool) -> tuple[float, float] | None:
        """Run ``query`` on ``other`` too: (overlap@10 of the shadow's or canary's hits with the live
        version's, milliseconds on ``other``), or None when it failed (never failing the query)."""
        started = time.perf_counter()
        try:
            vector = self._embed([query], other)[0]
            theirs = self._ranker.ranked(other, query, vector, max(k, 10), filters)
        except Exception:
            logger.warning("comparison query on version %s failed", other.info.version, exc_info=True)
            return None
        elapsed_ms = (time.perf_counter() - started) * 1000
        if reference_is_served:  # the shadow measured against the live hits served
            return overlap_at_10(theirs, served), elapsed_ms
        return overlap_at_10(served, theirs), elapsed_ms


__all__ = ["RolloutMeasuring"]

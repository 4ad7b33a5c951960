"""Vector stage: HNSW top-n over a loaded version's graph, with its search breadth safe between threads."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np


class EfGate:
    """Guards the one search breadth (``ef``) an hnswlib index holds for all threads.

    hnswlib keeps ``ef`` on the index: ``set_ef`` changes it for every thread, and each ``knn_query``
    reads it after releasing the GIL and searches with ``max(ef, k)``. A query therefore needs the
    index's ef to be its configured ef (never raised to its depth: ``k`` carries the depth), and the
    ef must not change while a search reads it. Searches that need the ef the index holds run
    concurrently; one that needs another ef waits until the searches in flight finish, and searches
    that arrive meanwhile wait behind it, so neither side starves. A retriever searches with one ef,
    so the index's ef is set by its first query and no search waits afterwards.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ef: int | None = None  # the ef set on the index; None before the first search
        self._running = 0  # searches in flight, all at self._ef
        self._waiting: Counter[int] = Counter()  # searches waiting, by the ef they need

    def _may_start(self, ef: int) -> bool:
        if ef == self._ef:  # join the searches at this ef unless a search needing another waits
            return not any(n for e, n in self._waiting.items() if e != ef)
        return self._running == 0  # change the ef only when no search reads it

    def knn_query(self, index: Any, vectors: np.ndarray, k: int, ef: int,
                  filter: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``index.knn_query(vectors, k)`` at breadth ``max(ef, k)``, only labels ``filter`` accepts when
        given (hnswlib's filter); hnswlib's RuntimeError passes through."""
        with self._cond:
            self._waiting[ef] += 1
            try:
                self._cond.wait_for(lambda: self._may_start(ef))
            finally:
                self._waiting[ef] -= 1
                if not self._waiting[ef]:
                    del self._waiting[ef]
            if ef != self._ef:
                index.set_ef(ef)
                self._ef = ef
            self._running += 1
            self._cond.notify_all()  # fewer waiters: searches at this ef may join
        try:
            if filter is None:
                return index.knn_query(vectors, k=k)
            return index.knn_query(vectors, k=k, filter=filter)
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

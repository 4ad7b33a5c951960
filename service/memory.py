"""What the service answered, remembered for a bounded time and count: feedback names a request by its
id and is recorded with the version that served it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """One search response: where it came from and the chunks it returned."""

    request_id: str
    alias: str
    version: str
    chunk_ids: frozenset[str]
    query: str


class RequestMemory:
    """The last ``size`` answers, each for at most ``ttl_s`` seconds; thread-safe, O(size) memory."""

    def __init__(self, size: int, ttl_s: float, clock: "type[time.monotonic] | None" = None) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock or time.monotonic
        self._answers: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, answer: Answer) -> None:
        with self._lock:
            self._answers[answer.request_id] = (self._clock(), answer)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)

    def recall(self, request_id: str) -> Answer | None:
        """The answer, or None when it was never given, or is older than ``ttl_s``, or was pushed out."""
        now = self._clock()
        with self._lock:
            while self._answers:  # oldest first: drop the expired ones
                first, (at, _) = next(iter(self._answers.items()))
                if now - at <= self.ttl_s:
                    break
                del self._answers[first]
            found = self._answers.get(request_id)
        return None if found is None else found[1]

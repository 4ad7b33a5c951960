"""Serving statistics of versions under rollout (canary, shadow, live) and the guards judged on them.

Pure logic over dataclasses: latency histograms with fixed buckets (so that deltas from many
processes add up), the per-version summary ``versions list`` shows, and guards such as
``overlap@10<0.6`` or ``p95_ms>50`` that abort a canary once enough queries were measured.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Upper bounds (ms) of the latency buckets: 0.25 ms growing by 20% to ~12 s, then one overflow bucket.
# A percentile is reported as its bucket's upper bound, so it is exact to within 20%.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(0.25 * 1.2 ** i, 4) for i in range(60))
BUCKETS = len(LATENCY_BOUNDS_MS) + 1

ROLES = ("live", "canary", "shadow")
GUARD_METRICS = ("overlap@10", "p50_ms", "p95_ms")
_GUARD = re.compile(r"^\s*(overlap@10|p50_ms|p95_ms)\s*(<|>)\s*([0-9]*\.?[0-9]+)\s*$")


def latency_bucket(ms: float) -> int:
    """The index of the bucket ``ms`` falls in."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, ms)


def percentile_ms(buckets: Sequence[int], p: float) -> float | None:
    """The ``p`` (0..1) percentile of a latency histogram: the upper bound of its bucket (None if empty)."""
    total = sum(buckets)
    if not total:
        return None
    wanted, seen = p * total, 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= wanted and count:
            return LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else float("inf")
    return float("inf")  # pragma: no cover - seen reaches total


@dataclass
class StatsDelta:
    """What one process measured of one (alias, version, role) since its last write."""

    alias: str
    version: str
    role: str
    queries: int = 0
    compared: int = 0  # queries also run on the live version, for overlap@10
    overlap_sum: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def record(self, latency_ms: float, overlap_at_10: float | None = None) -> None:
        self.queries += 1
        self.latency_buckets[latency_bucket(latency_ms)] += 1
        if overlap_at_10 is not None:
            self.compared += 1
            self.overlap_sum += overlap_at_10


@dataclass(frozen=True)
class VersionStats:
    """Statistics of one version in one role, summed over every process that served it."""

    version: str
    role: str
    queries: int
    compared: int
    overlap_at_10: float | None
    p50_ms: float | None
    p95_ms: float | None

    @classmethod
    def from_sums(cls, version: str, role: str, queries: int, compared: int, overlap_sum: float,
                  buckets: Sequence[int]) -> "VersionStats":
        return cls(version, role, int(queries), int(compared), overlap_sum / compared if compared else None,
                   percentile_ms(buckets, 0.50), percentile_ms(buckets, 0.95))

    def metric(self, name: str) -> float | None:
        return {"overlap@10": self.overlap_at_10, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms}[name]

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "queries": self.queries, "compared": self.compared,
                "overlap@10": None if self.overlap_at_10 is None else round(self.overlap_at_10, 4),
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms}


@dataclass(frozen=True)
class Guard:
    """Abort the canary when ``metric op threshold`` holds, e.g. ``overlap@10 < 0.6``."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> "Guard":
        """``overlap@10<0.6``, ``p95_ms>50``, ...

        Raises:
            ValueError: not ``METRIC<NUMBER`` or ``METRIC>NUMBER`` with a metric of :data:`GUARD_METRICS`.
        """
        match = _GUARD.match(text)
        if match is None:
            raise ValueError(f"guard {text!r} is not METRIC<NUMBER or METRIC>NUMBER with METRIC one of "
                             f"{', '.join(GUARD_METRICS)} (e.g. 'overlap@10<0.6', 'p95_ms>50')")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Guard":
        return cls(str(data["metric"]), str(data["op"]), float(data["threshold"]))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold}

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def breached(self, stats: VersionStats) -> bool:
        value = stats.metric(self.metric)
        if value is None:
            return False
        return value < self.threshold if self.op == "<" else value > self.threshold


def guard_breach(guards: Sequence[Guard], stats: VersionStats | None, min_queries: int) -> str | None:
    """Why the canary must be aborted (the first guard it breaches), or None.

    A guard is judged once its metric rests on ``min_queries`` measurements: compared queries for
    overlap@10, served queries for latencies.
    """
    if stats is None:
        return None
    for guard in guards:
        count = stats.compared if guard.metric == "overlap@10" else stats.queries
        if count >= min_queries and guard.breached(stats):
            value = stats.metric(guard.metric)
            return (f"guard {guard} breached: {guard.metric} {value:.4g} over {count} queries "
                    f"of canary {stats.version}")
    return None


__all__ = ["BUCKETS", "GUARD_METRICS", "Guard", "LATENCY_BOUNDS_MS", "ROLES", "StatsDelta", "VersionStats",
           "guard_breach", "latency_bucket", "percentile_ms"]

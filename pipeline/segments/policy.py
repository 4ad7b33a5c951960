"""Merge policy: which segments to merge so that a version stays a few segments, as a pure function.

Tiered, after Lucene's TieredMergePolicy. A segment's size is its bytes scaled by its live share;
for the budget and for skew, sizes below ``floor_bytes`` count as ``floor_bytes``, so that many tiny
segments are not each a tier. The index may hold a budget of segments that grows with the logarithm
of its size: up to ``segments_per_tier`` segments of the floor size, as many of ``merge_factor``
times that size, and so on (segments larger than half of ``max_merged_bytes`` are never merged and
count one each). While the version has more segments than its budget, the policy merges the window
of similar-sized segments (adjacent in size order) with the lowest score — low skew (the largest
input a small share of the result), small result, many deleted bytes reclaimed — and counts the
result as one segment that this plan does not merge again. A segment whose deleted share exceeds
``deletes_pct_allowed`` is rewritten without its deleted chunks.

Two rules keep a merge's cost in proportion to what it gains (as in recent Lucene versions):

- a merge must grow its largest input by at least ``min_growth`` (its result at least 1.25 times the
  largest input's live bytes): a large segment is never rewritten to absorb a few small ones
  (rewriting it rebuilds its whole graph); it is merged only once segments of its own tier have
  accumulated, or rewritten alone for its deletions. Below the floor too: a segment that absorbs
  others grows geometrically, so each chunk is rewritten a logarithmic number of times, never once
  per upsert;
- a merge whose result stays below the floor may take any number of inputs (beyond
  ``max_merge_at_once``): tiny segments, one per upsert, merge among themselves in one go.

A third rule concerns segments published without a graph (searched exactly, see
``pipeline.segments.writer``): one of ``index_rows`` live chunks or more is rewritten with its graph
(reason ``index``), since searching it exactly costs every query more than its graph would; a run
publishes such a segment at once, and the compaction after it builds the graph.

So the plan may leave a version over its budget where no merge is worth its cost (each remaining
segment more than ``1 / (min_growth - 1)`` times the next smaller one); the count stays logarithmic
in the ratio of the largest segment to the smallest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class SegmentStats:
    """What the policy knows of a segment in a version: its live and deleted chunks and its bytes."""

    name: str
    live: int
    deleted: int
    bytes: int
    exact: bool = False  # written without a graph: searched exactly

    @property
    def deleted_share(self) -> float:
        rows = self.live + self.deleted
        return self.deleted / rows if rows else 0.0

    @property
    def size(self) -> float:
        """Bytes the live chunks account for."""
        return self.bytes * (1.0 - self.deleted_share)


@dataclass(frozen=True)
class TieredPolicy:
    """The policy's parameters. The defaults keep at most 10 segments at 1M chunks of ~4 KB each
    (a 384-dimensional vector, its graph links, text and postings), merging 4 at a time above the floor."""

    segments_per_tier: int = 4
    max_merge_at_once: int = 4
    floor_bytes: int = 128 * MIB
    max_merged_bytes: int = 5 * 1024 * MIB
    deletes_pct_allowed: float = 0.20
    min_growth: float = 1.25
    index_rows: int = 2048  # a segment without a graph with this many live chunks gets one; merges give one from here

    def __post_init__(self) -> None:
        if self.segments_per_tier < 2 or self.max_merge_at_once < 2:
            raise ValueError("segments_per_tier and max_merge_at_once must be at least 2")
        if self.floor_bytes <= 0 or self.max_merged_bytes <= self.floor_bytes:
            raise ValueError("need 0 < floor_bytes < max_merged_bytes")
        if not 0.0 < self.deletes_pct_allowed <= 1.0:
            raise ValueError("deletes_pct_allowed must be in (0, 1]")
        if self.min_growth < 1.0:
            raise ValueError("min_growth must be at least 1")

    @property
    def merge_factor(self) -> int:
        return min(self.max_merge_at_once, self.segments_per_tier)


@dataclass(frozen=True)
class Merge:
    """One merge to run: its input segments (largest first) and why."""

    segments: tuple[str, ...]
    reason: str  # "tiers": too many segments for the index's size; "deletes": too many deleted chunks;
    # "index": a segment searched exactly that is large enough for a graph
    live: int
    size: float


def allowed_segments(sizes: Sequence[float], policy: TieredPolicy) -> int:
    """The segment budget of an index whose segments have these live sizes (bytes)."""
    big = policy.max_merged_bytes / 2
    mergeable = [s for s in sizes if s <= big]
    allowed = len(sizes) - len(mergeable)
    remaining = float(sum(mergeable))
    if not mergeable:
        return max(allowed, policy.segments_per_tier)
    level = max(min(mergeable), policy.floor_bytes)
    while True:
        count = remaining / level
        if count < policy.segments_per_tier or level >= policy.max_merged_bytes:
            allowed += math.ceil(count)
            break
        allowed += policy.segments_per_tier
        remaining -= policy.segments_per_tier * level
        level *= policy.merge_factor
    return max(allowed, policy.segments_per_tier)


@dataclass
class _Slot:
    size: float
    stats: SegmentStats | None  # None: the result of a merge planned here (not merged again)


def plan_merges(segments: Sequence[SegmentStats], policy: TieredPolicy = TieredPolicy()) -> list[Merge]:
    """The merges that bring ``segments`` within the policy: deletion rewrites, then tier merges.

    Every segment is in at most one merge; after the merges the version holds at most
    :func:`allowed_segments` segments, unless no merge that remains is worth its cost (see the module).
    """
    merges: list[Merge] = []
    slots: list[_Slot] = []
    for s in segments:
        if s.live + s.deleted and s.deleted_share > policy.deletes_pct_allowed:
            merges.append(Merge((s.name,), "deletes", s.live, s.size))
            slots.append(_Slot(s.size, None))
        elif s.exact and s.live >= policy.index_rows:
            merges.append(Merge((s.name,), "index", s.live, s.size))
            slots.append(_Slot(s.size, None))
        else:
            slots.append(_Slot(s.size, s))
    allowed = allowed_segments([slot.size for slot in slots], policy)
    while len(slots) > allowed:
        best = _best_window(slots, policy)
        if best is None:
            break
        chosen = [slot.stats for slot in best if slot.stats is not None]
        size = sum(slot.size for slot in best)
        merges.append(Merge(tuple(s.name for s in chosen), "tiers", sum(s.live for s in chosen), size))
        slots = [slot for slot in slots if all(slot is not b for b in best)] + [_Slot(size, None)]
    return merges


def _best_window(slots: list[_Slot], policy: TieredPolicy) -> list[_Slot] | None:
    """The window of similar-sized mergeable segments with the lowest merge score, or None."""
    candidates = sorted((s for s in slots if s.stats is not None and s.size <= policy.max_merged_bytes / 2),
                        key=lambda s: (-s.size, s.stats.name if s.stats else ""))
    best: list[_Slot] | None = None
    best_score = math.inf
    for start in range(len(candidates) - 1):
        window = _window(candidates[start:], policy)
        if len(window) < 2 or not _worth_it(window, policy):
            continue
        score = _score(window, policy)
        if score < best_score:
            best, best_score = window, score
    return best


def _window(candidates: list[_Slot], policy: TieredPolicy) -> list[_Slot]:
    """The largest first candidate and the next ones in size order, up to ``max_merge_at_once`` of
    them (any number while the result stays below the floor), skipping any that would make the
    result larger than ``max_merged_bytes``."""
    window: list[_Slot] = []
    total = 0.0
    for slot in candidates:
        if len(window) >= policy.max_merge_at_once and total + slot.size > policy.floor_bytes:
            break
        if total + slot.size > policy.max_merged_bytes:
            continue
        window.append(slot)
        total += slot.size
    return window


def _worth_it(window: list[_Slot], policy: TieredPolicy) -> bool:
    """Whether the merge grows its largest input by ``min_growth`` at least."""
    total = sum(slot.size for slot in window)
    return total >= policy.min_growth * window[0].size


def _score(window: list[_Slot], policy: TieredPolicy) -> float:
    """Lower is better: skew (the largest input's share of the result, sizes floored), times a
    slight preference for smaller results, times the squared live share of the inputs' bytes (a
    merge that reclaims deleted chunks is preferred)."""
    floored = [max(slot.size, policy.floor_bytes) for slot in window]
    skew = floored[0] / sum(floored)
    after = sum(slot.size for slot in window)
    before = sum(slot.stats.bytes for slot in window if slot.stats is not None) or 1.0
    return skew * max(after, 1.0) ** 0.05 * (after / before) ** 2

"""Fusion: combine ranked candidate lists from BM25 and vector search (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> dict[int, float]:
    """Score = sum over lists of 1 / (k + rank), rank 1-based. Returns key -> fused score."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return fused


def minmax(scores: Mapping[int, float]) -> dict[int, float]:
    """Scale scores to [0, 1] (all equal scores become 1)."""
    if not scores:
        return {}
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return {key: 1.0 for key in scores}
    return {key: (value - lo) / (hi - lo) for key, value in scores.items()}


def weighted_fusion(lists: Sequence[tuple[Mapping[int, float], float]]) -> dict[int, float]:
    """Sum of weight * minmax-normalized score per list; a key missing from a list gets 0 there."""
    fused: dict[int, float] = {}
    for scores, weight in lists:
        for key, value in minmax(scores).items():
            fused[key] = fused.get(key, 0.0) + weight * value
    return fused

"""Rerank stage: rescore the fused candidates before the final cut.

- :class:`ExactHybridRescorer` (the default, offline): every candidate gets both its exact cosine
  similarity (full-precision vector) and its exact BM25 score — also the candidates only one retriever
  found — and the final score is a weighted sum of the two, each min-max normalized over the
  candidates. It fixes what rank fusion cannot: a candidate's missing score in one list.
- :class:`CrossEncoderReranker`: any sentence-transformers CrossEncoder, by name or local path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from retrieval.fusion import minmax

if TYPE_CHECKING:
    from retrieval.loaded import LoadedVersion


class Reranker(Protocol):
    """Scores (query, candidate) pairs; a higher score is better."""

    name: str

    def rerank(
        self, query: str, query_vector: np.ndarray, keys: Sequence[int], version: "LoadedVersion",
        bm25_scores: np.ndarray,
    ) -> dict[int, float]: ...


class ExactHybridRescorer:
    """``vector_weight * minmax(cosine) + (1 - vector_weight) * minmax(BM25)`` over the candidates."""

    def __init__(self, vector_weight: float = 0.7) -> None:
        if not 0.0 <= vector_weight <= 1.0:
            raise ValueError(f"vector_weight must be within [0, 1], got {vector_weight}")
        self.vector_weight = vector_weight
        self.name = f"exact-hybrid(vector={vector_weight:g})"

    def rerank(
        self, query: str, query_vector: np.ndarray, keys: Sequence[int], version: "LoadedVersion",
        bm25_scores: np.ndarray,
    ) -> dict[int, float]:
        keys = list(keys)
        if not keys:
            return {}
        cosine = version.vectors(keys) @ query_vector
        bm25 = np.array([bm25_scores[version.bm25_row[k]] for k in keys], dtype=np.float64)
        v = minmax(dict(zip(keys, cosine.tolist())))
        b = minmax(dict(zip(keys, bm25.tolist()))) if bm25.max() > 0 else {k: 0.0 for k in keys}
        w = self.vector_weight
        return {k: w * v[k] + (1.0 - w) * b[k] for k in keys}


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder (name or path), loaded on first use."""

    def __init__(self, model: str, *, device: str = "cpu", batch_size: int = 32, max_length: int = 512) -> None:
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"cross-encoder({model})"

    @cached_property
    def _model(self):  # type: ignore[no-untyped-def]
        from sentence_transformers import CrossEncoder

        return CrossEncoder(self.model_name, device=self.device, max_length=self.max_length)

    def rerank(
        self, query: str, query_vector: np.ndarray, keys: Sequence[int], version: "LoadedVersion",
        bm25_scores: np.ndarray,
    ) -> dict[int, float]:
        keys = list(keys)
        if not keys:
            return {}
        texts = version.columns["text"]
        pairs = [(query, texts[version.row[k]]) for k in keys]
        scores = np.asarray(self._model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False))
        if scores.ndim > 1:  # a model with several labels: take the last (the "relevant" one)
            scores = scores[:, -1]
        return dict(zip(keys, scores.astype(np.float64).tolist()))


def make_reranker(spec: str | None, device: str = "cpu") -> Reranker | None:
    """``exact`` (default), ``none``, ``exact:0.6`` (vector weight) or a cross-encoder name or path."""
    if spec is None or spec == "exact":
        return ExactHybridRescorer()
    if spec == "none":
        return None
    if spec.startswith("exact:"):
        return ExactHybridRescorer(float(spec.split(":", 1)[1]))
    return CrossEncoderReranker(spec.removeprefix("cross-encoder:"), device=device)

"""Rerank stage: rescore the fused candidates before the final cut.

- :class:`ExactHybridRescorer` (the default, offline): every candidate gets both its exact cosine
  similarity (full-precision vector) and its exact BM25 score — also the candidates only one retriever
  found — and the final score is a weighted sum of the two, each scaled into [0, 1] by dividing by
  its best value with a fixed floor of 0 (cosine below 0 counts as 0). It fixes what rank fusion
  cannot: a candidate's missing score in one list. A fixed floor, unlike min-max over the
  candidates, makes a candidate's score independent of how deep the candidate list goes and of
  its weakest members (Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", 2023,
  found the same: theoretical-minimum normalization is the robust choice for convex combination).
- :class:`CrossEncoderReranker`: any sentence-transformers CrossEncoder, by name or local path. It
  scores the text that was embedded: the chunk's context (its document's title and heading path) and its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from retrieval.artifacts import indexed_text

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
    """``vector_weight * cosine / best cosine + (1 - vector_weight) * BM25 / best BM25``, floor 0.

    The best cosine is that of the best candidate; the best BM25 score is that of the best chunk of
    the whole version (``bm25_scores`` holds them all), so neither depends on the candidate depth.
    """

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
        cosine = np.clip(version.vectors(keys).astype(np.float64) @ query_vector, 0.0, None)
        bm25 = np.array([bm25_scores[version.bm25_row[k]] for k in keys], dtype=np.float64)
        best_cosine = float(cosine.max())
        best_bm25 = float(bm25_scores.max()) if len(bm25_scores) else 0.0
        v = cosine / best_cosine if best_cosine > 0 else np.zeros_like(cosine)
        b = bm25 / best_bm25 if best_bm25 > 0 else np.zeros_like(bm25)
        combined = self.vector_weight * v + (1.0 - self.vector_weight) * b
        return dict(zip(keys, combined.tolist()))


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
        from registry.extras import require

        st = require("sentence_transformers", "pipeline", f"the cross-encoder reranker {self.model_name!r}")
        return st.CrossEncoder(self.model_name, device=self.device, max_length=self.max_length)

    def rerank(
        self, query: str, query_vector: np.ndarray, keys: Sequence[int], version: "LoadedVersion",
        bm25_scores: np.ndarray,
    ) -> dict[int, float]:
        keys = list(keys)
        if not keys:
            return {}
        # the text that was embedded and BM25-indexed: the chunk's context (title and heading path) first
        texts, contexts = version.columns["text"], version.columns["context"]
        pairs = [(query, indexed_text(contexts[version.row[k]], texts[version.row[k]])) for k in keys]
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

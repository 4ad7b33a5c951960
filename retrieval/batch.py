"""Batched search: many queries (each with its own k and filters) answered from one version with one
encoder call and one HNSW call, and how long each stage took (what a server reports per stage)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Query:
    """One query of a batch: its text, how many hits, and its filters (``doc_id_prefix``,
    ``metadata``, ``as_of``; see :meth:`retrieval.Retriever.search`)."""

    text: str
    k: int = 10
    filters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class BatchResult:
    """The hits of every query of a batch, in order, all from ``version`` of ``alias``.

    ``stage_seconds`` holds the batch's wall time per stage: ``embed`` (one encoder call for the
    queries not in the query cache), ``vector`` (one HNSW call), ``rank`` (BM25, fusion, rerank and
    filters, query by query).
    """

    alias: str
    version: str
    hits: list[Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)

"""Hits: one retrieved chunk with its attribution and every stage's score and rank."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class StageScore:
    """A stage's score and 1-based rank for a hit; both None when the stage did not see it."""

    score: float | None = None
    rank: int | None = None


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk: where it comes from, which version served it, and how each stage scored it."""

    doc_id: str
    chunk_id: str
    text: str
    source_uri: str
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    ordinal: int
    chunk_hash: str
    index_version: str
    alias: str
    version_updated_at: datetime | None
    model_id: str
    bm25: StageScore
    vector: StageScore
    fused: StageScore
    rerank: StageScore
    metadata: dict[str, Any]
    # 1-based physical pages the chunk spans, and the labels the file prints on them (PDF; else None)
    page_start: int | None = None
    page_end: int | None = None
    page_label_start: str | None = None
    page_label_end: str | None = None

    @property
    def score(self) -> float:
        """The final score: the reranker's when it ran, else the fused one."""
        return float(self.rerank.score if self.rerank.score is not None else self.fused.score or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamps as ISO 8601, the heading path as a list)."""
        out = asdict(self)
        out["heading_path"] = list(self.heading_path)
        out["version_updated_at"] = self.version_updated_at.isoformat() if self.version_updated_at else None
        out["score"] = self.score
        return out

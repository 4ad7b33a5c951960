"""The retrieval library applications import: hybrid search over a published index, with attribution.

    from retrieval import Retriever

    with Retriever.open(index="docs") as retriever:
        for hit in retriever.search("how are deleted documents handled?", k=5):
            print(hit.source_uri, hit.heading_path, hit.char_start, hit.char_end, hit.score)

Nothing is imported or opened until a Retriever is opened (no I/O at import). Never imports Airflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Hit", "Hits", "RetrievalConfig", "Retriever", "StageScore"]

if TYPE_CHECKING:
    from retrieval.hit import Hit, StageScore
    from retrieval.retriever import Hits, RetrievalConfig, Retriever


def __getattr__(name: str) -> Any:
    if name in ("Hit", "StageScore"):
        from retrieval import hit

        return getattr(hit, name)
    if name in ("Hits", "RetrievalConfig", "Retriever"):
        from retrieval import retriever

        return getattr(retriever, name)
    raise AttributeError(name)

"""Feedback on a served response, written to the registry with the version that served it."""

from __future__ import annotations

from registry import FeedbackEntry
from service.indexes import ServedIndexes
from service.memory import Answer
from service.schemas import FeedbackRequest


def record(served: ServedIndexes, answer: Answer, body: FeedbackRequest) -> int:
    """Store ``body``'s score for ``answer``; returns the feedback id."""
    version = served.registry_read(lambda r: r.get_version(answer.version))
    entry = FeedbackEntry(request_id=answer.request_id, index_name=version.index_name if version else answer.alias,
                          alias=answer.alias, version=answer.version, chunk_id=body.chunk_id, kind=body.kind,
                          source=body.source, score=body.score, query=answer.query)
    return int(served.registry_write(lambda r: r.record_feedback(entry)))

"""Quality feedback in the registry: scores of served responses, kept with the version that served them."""

from __future__ import annotations

from dataclasses import asdict

import psycopg

from registry.queries import fetch_all, q
from registry.rows import FeedbackEntry, QualityRow


class FeedbackStore:
    """Feedback operations; mixed into :class:`registry.Registry`."""

    conn: psycopg.Connection

    def record_feedback(self, entry: FeedbackEntry) -> int:
        """Store one score; returns its feedback id."""
        row = self.conn.execute(q("insert_feedback"), asdict(entry)).fetchone()
        assert row is not None
        return int(row[0])

    def quality_report(self, index: str | None = None) -> list[QualityRow]:
        """Feedback aggregated per version (newest first), kind and source; every index when ``index`` is None."""
        return fetch_all(self.conn, "quality_report", QualityRow, {"index": index})

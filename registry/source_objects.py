"""The registry's memory of object-store listings: which objects were read, as listed, into what.

A run of an object-store source reads only the objects whose listing changed since the last run
that succeeded; this is where it finds that listing, and where it records the new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from registry.queries import fetch_all, q
from registry.rows import SourceObjectRow


class SourceObjectStore:
    """The ``source_objects`` table (mixed into :class:`registry.Registry`)."""

    conn: psycopg.Connection

    def source_objects(self, index: str, source: str) -> dict[str, SourceObjectRow]:
        """The recorded objects of ``source`` (its URI) in ``index``, by doc_id."""
        rows = fetch_all(self.conn, "source_objects", SourceObjectRow, {"index": index, "source": source})
        return {row.doc_id: row for row in rows}

    def record_source_objects(
        self, index: str, source: str, rows: Sequence[SourceObjectRow], forget: Sequence[str] = ()
    ) -> None:
        """Record (insert or replace) the objects read by a run, and forget those no longer listed,
        in one transaction."""
        if not rows and not forget:
            return
        params = {"index": index, "source": source}
        with self.conn.transaction(), self.conn.cursor() as cur:
            if rows:
                cur.execute(q("create_stage_source_objects"))
                with cur.copy(q("copy_stage_source_objects")) as copy:
                    for r in rows:
                        copy.write_row((r.doc_id, r.etag, r.size, r.mtime, r.fingerprint, r.content_hash,
                                        r.skip_reason, r.skip_gone))
                cur.execute(q("merge_source_objects"), params)
            if forget:
                cur.execute(q("forget_source_objects"), {**params, "doc_ids": list(forget)})

"""Index versions and aliases in the registry: staging, publishing, swapping, rolling back.

A version's chunk set is the range ``added_seq <= seq < retired_seq`` over chunk rows (see
sql/002_versions.sql). Staging writes a version's new rows as 'pending' and marks the rows it drops
with ``retired_seq``; nothing a reader sees changes until :meth:`VersionStore.publish` flips them,
moves the alias and notifies listeners — all in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from registry.errors import RegistryError
from registry.queries import fetch_all, fetch_one, q
from registry.rows import (
    AliasRow,
    ChunkRow,
    DocumentFields,
    UnfinishedVersion,
    VersionListing,
    VersionRef,
    VersionRow,
)

NOTIFY_CHANNEL = "ragpipe_alias"


class AliasError(RegistryError):
    """An alias operation names something that does not exist or cannot be served."""


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: str
    previous: str | None
    action: str


class VersionStore:
    """Version and alias operations; mixed into :class:`registry.Registry`."""

    conn: psycopg.Connection

    # -- building --------------------------------------------------------------------------------

    def head_version(self, index: str) -> VersionRef | None:
        return fetch_one(self.conn, "head_version", VersionRef, {"index": index})

    def create_version(
        self, *, index: str, version: str, parent: str | None, run_id: int, model_id: str, full_build: bool
    ) -> int:
        row = self.conn.execute(
            q("create_version"),
            {"index": index, "version": version, "parent": parent, "run_id": run_id, "model_id": model_id,
             "full_build": full_build},
        ).fetchone()
        assert row is not None
        return int(row[0])

    def unfinished_versions(self, index: str) -> list[UnfinishedVersion]:
        return fetch_all(self.conn, "unfinished_versions", UnfinishedVersion, {"index": index})

    def abandon_version(self, index: str, version: str, seq: int, reason: str, metrics: dict[str, Any] | None = None) -> None:
        """Undo a version's staging and record it as rejected (one transaction)."""
        with self.conn.transaction():
            self.conn.execute(q("unstage_retired"), {"index": index, "seq": seq})
            self.conn.execute(q("unstage_added"), {"index": index, "seq": seq})
            self.conn.execute(q("reject_version"), {"version": version, "reason": reason, "metrics": Jsonb(metrics or {})})

    def stage_version(
        self,
        *,
        index: str,
        version: str,
        seq: int,
        run_id: int,
        chunks: Iterable[Any],
        valid_from: dict[str, datetime | None],
        rechunked_doc_ids: Sequence[str],
        deleted_doc_ids: Sequence[str],
    ) -> tuple[int, int]:
        """Write a version's new chunk rows as 'pending' and mark the rows it drops.

        Returns:
            (rows added, rows marked for retirement).
        """
        params = {"index": index, "version": version, "seq": seq, "run_id": run_id}
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(q("create_stage_chunks_versioned"))
            with cur.copy(q("copy_stage_chunks_versioned")) as copy:
                for c in chunks:
                    pages = (c.pages.start, c.pages.end, c.pages.label_start, c.pages.label_end) if c.pages else (
                        None, None, None, None)
                    copy.write_row(
                        (c.doc_id, c.chunk_id, c.chunk_hash, c.ordinal, list(c.heading_path), c.char_start,
                         c.char_end, c.token_count, c.text, valid_from.get(c.doc_id), c.context, *pages)
                    )
            cur.execute(q("stage_new_chunks"), params)
            added = cur.rowcount
            cur.execute(q("stage_retire_replaced"), {**params, "doc_ids": list(rechunked_doc_ids)})
            retired = cur.rowcount
            cur.execute(q("stage_retire_deleted"), {**params, "doc_ids": list(deleted_doc_ids)})
            retired += cur.rowcount
        return added, retired

    def version_changes(self, index: str, seq: int) -> tuple[list[int], list[int]]:
        """Return (added keys, removed keys) of a staged version relative to its parent."""
        added: list[int] = []
        removed: list[int] = []
        for key, is_added in self.conn.execute(q("version_changes"), {"index": index, "seq": seq}):
            (added if is_added else removed).append(int(key))
        return sorted(added), sorted(removed)

    def member_keys(self, index: str, seq: int) -> set[int]:
        with self.conn.cursor() as cur:
            cur.execute(q("member_keys"), {"index": index, "seq": seq})
            return {int(r[0]) for r in cur}

    def member_rows(self, index: str, seq: int, doc_ids: Sequence[str] | None = None) -> list[ChunkRow]:
        """Chunk rows of a version (all, or only those of ``doc_ids``), by chunk_key."""
        return fetch_all(self.conn, "member_rows", ChunkRow,
                         {"index": index, "seq": seq, "all_docs": doc_ids is None, "doc_ids": list(doc_ids or [])})

    def iter_member_rows(self, index: str, seq: int, page: int = 4096, *, after: int = 0,
                         until: int | None = None) -> Iterator[list[ChunkRow]]:
        """A version's chunk rows by chunk_key, ``page`` rows at a time (never all of them at once);
        only keys above ``after`` and up to ``until`` (None: no bound)."""
        while True:
            rows = fetch_all(self.conn, "member_rows_page", ChunkRow,
                             {"index": index, "seq": seq, "after": after, "until": until, "limit": page})
            if rows:
                yield rows
            if len(rows) < page:
                return
            after = rows[-1].chunk_key

    def member_key_bounds(self, index: str, seq: int, rows: int) -> list[int]:
        """Every ``rows``-th chunk key of the version, ascending (the last keys of consecutive runs of
        ``rows`` members)."""
        with self.conn.cursor() as cur:
            cur.execute(q("member_key_bounds"), {"index": index, "seq": seq, "rows": rows})
            return [int(r[0]) for r in cur]

    def member_count(self, index: str, seq: int) -> int:
        row = self.conn.execute(q("member_count"), {"index": index, "seq": seq}).fetchone()
        return int(row[0]) if row else 0

    def document_fields(self, index: str) -> dict[str, DocumentFields]:
        """The fields of the index's active documents, by doc_id."""
        return {d.doc_id: d for d in fetch_all(self.conn, "document_fields", DocumentFields, {"index": index})}

    def mark_version_built(self, version: str, artifact_uri: str, manifest: dict[str, Any]) -> None:
        self.conn.execute(q("mark_version_built"),
                          {"version": version, "artifact_uri": artifact_uri, "manifest": Jsonb(manifest)})

    def mark_version_validated(self, version: str, metrics: dict[str, Any]) -> None:
        self.conn.execute(q("mark_version_validated"), {"version": version, "metrics": Jsonb(metrics)})

    # -- publishing ------------------------------------------------------------------------------

    def publish(
        self,
        *,
        index: str,
        alias: str,
        version: str,
        seq: int,
        run_id: int,
        documents: Iterable[Any],
        chunk_counts: dict[str, int],
        chunker_versions: dict[str, str],
        valid_from: dict[str, datetime | None],
        deleted_doc_ids: Sequence[str],
        shadow: bool = False,
        before_commit: Any = None,
    ) -> AliasMove:
        """Make a validated version live in one transaction.

        Document rows are updated, the version's pending rows become active and the rows it drops
        superseded (or deleted, for deleted documents), the index head moves, and the alias points
        at the version. With ``shadow``, the version becomes the alias's shadow and nothing else
        changes: documents, active rows and the head stay the regular lineage's (the version's rows
        are kept as its own). Listeners on the ``ragpipe_alias`` channel are notified when the
        transaction commits.
        """
        params = {"index": index, "run_id": run_id, "seq": seq, "version": version}
        if shadow:
            return self._attach_shadow(alias, index, params, before_commit)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(q("create_stage_documents"))
            with cur.copy(q("copy_stage_documents_versioned")) as copy:
                for doc in documents:
                    copy.write_row((doc.doc_id, doc.source_uri, doc.content_hash, Jsonb(doc.metadata), doc.metadata_hash,
                                    chunker_versions[doc.doc_id], chunk_counts[doc.doc_id],
                                    valid_from.get(doc.doc_id)))
            cur.execute(q("merge_documents_versioned"), params)
            cur.execute(q("mark_documents_deleted"), {**params, "doc_ids": list(deleted_doc_ids)})
            cur.execute(q("publish_retire_chunks"), {**params, "deleted": list(deleted_doc_ids)})
            cur.execute(q("publish_activate_chunks"), params)
            cur.execute(q("publish_valid_from"), {**params, "doc_ids": list(valid_from)})
            cur.execute(q("set_head"), params)
            move = self._move_alias(alias, index, version, "publish")
            if before_commit:
                before_commit()
        return move

    def _attach_shadow(self, alias: str, index: str, params: dict[str, Any], before_commit: Any) -> AliasMove:
        """A shadow's publish: the version goes beside the lineage, not on it (sql/011_shadow_lineage.sql).

        The rows it added become its own ('shadow'), the regular rows it dropped stay active and are
        listed as not its own; documents, active rows and the head stay the regular lineage's, so the
        next regular run builds on the last regular version.
        """
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(q("shadow_keep_added"), params)
            cur.execute(q("shadow_exclude_retired"), params)
            cur.execute(q("unstage_retired"), params)
            move = self._move_alias(alias, index, params["version"], "shadow")
            if before_commit:
                before_commit()
        return move

    def _move_alias(self, alias: str, index: str, version: str, action: str, reason: str | None = None) -> AliasMove:
        """Point ``alias`` (or its shadow) at ``version``; the caller holds a transaction. An alias moved
        onto its canary has no canary any more."""
        current = self.conn.execute(q("lock_alias"), {"alias": alias}).fetchone()
        if current and current[1] != index:
            raise AliasError(f"alias {alias!r} serves index {current[1]!r}, not {index!r}")
        previous = current[2] if current else None
        if action == "shadow":
            if current is None:
                raise AliasError(f"alias {alias!r} has no live version yet; publish one before a shadow")
            self.conn.execute(q("upsert_alias"), {"alias": alias, "index": index, "version": previous,
                                                  "shadow": version})
            self.conn.execute(q("set_version_status"), {"version": version, "status": "validated"})
            previous = current[3]
            if previous and previous != version:  # a replaced shadow is kept for gc like any old version
                self.conn.execute(q("set_version_status"), {"version": previous, "status": "retired"})
        else:
            shadow = current[3] if current and current[3] != version else None
            self.conn.execute(q("upsert_alias"), {"alias": alias, "index": index, "version": version,
                                                  "shadow": shadow})
            self.conn.execute(q("set_version_status"), {"version": version, "status": "published"})
            if previous and previous != version:
                self.conn.execute(q("set_version_status"), {"version": previous, "status": "retired"})
            self.conn.execute(q("clear_canary_of_version"), {"alias": alias, "version": version})
        self.conn.execute(q("record_alias_move"),
                          {"alias": alias, "version": version, "previous": previous, "action": action,
                           "reason": reason})
        payload = json.dumps({"alias": alias, "index": index, "version": version, "action": action})
        self.conn.execute(q("notify_alias"), {"payload": payload})
        return AliasMove(alias, version, previous, action)

    def get_version(self, version: str) -> VersionRow | None:
        return fetch_one(self.conn, "get_version", VersionRow, {"version": version})

    def swap_alias(self, alias: str, version: str, action: str = "swap") -> AliasMove:
        """Point an existing alias at another retained version of its index.

        Servable are versions that were published before (status published or retired) and the
        alias's own shadow. The alias row and the version row are locked, so a concurrent gc cannot
        remove the version while the alias moves onto it.
        """
        with self.conn.transaction():
            current = self.conn.execute(q("lock_alias"), {"alias": alias}).fetchone()
            if current is None:
                raise AliasError(f"alias {alias!r} does not exist")
            target = self.conn.execute(q("lock_version"), {"version": version}).fetchone()
            if target is None:
                raise AliasError(f"version {version!r} does not exist")
            if target[1] != current[1]:
                raise AliasError(f"version {version} belongs to index {target[1]!r}; alias {alias!r} serves {current[1]!r}")
            if target[2] not in ("published", "retired") and version != current[3]:
                raise AliasError(f"version {version} is {target[2]}; only versions that were published can be served")
            return self._move_alias(alias, current[1], version, action)

    def rollback_candidate(self, alias: str) -> str:
        """The newest retained version older than the alias's live one."""
        current = self.conn.execute("SELECT index_name, version FROM aliases WHERE alias = %s", (alias,)).fetchone()
        if current is None:
            raise AliasError(f"alias {alias!r} does not exist")
        live = self.get_version(current[1])
        assert live is not None
        row = self.conn.execute(q("rollback_target"), {"index": current[0], "seq": live.version_seq}).fetchone()
        if row is None:
            raise AliasError(f"alias {alias!r} is on {current[1]}; no older retained version to roll back to")
        return str(row[0])

    def rollback_alias(self, alias: str) -> AliasMove:
        """Point an alias at the newest retained version older than its live one."""
        return self.swap_alias(alias, self.rollback_candidate(alias), action="rollback")

    def shadow_of(self, alias: str) -> str:
        row = self.conn.execute("SELECT shadow_version FROM aliases WHERE alias = %s", (alias,)).fetchone()
        if row is None:
            raise AliasError(f"alias {alias!r} does not exist")
        if row[0] is None:
            raise AliasError(f"alias {alias!r} has no shadow version to promote")
        return str(row[0])

    def promote_shadow(self, alias: str) -> AliasMove:
        """Make the alias's shadow version its live one.

        The index head stays the last regular version: a run with the model it was built with goes on
        incrementally from there; the first run with the shadow's model rebuilds (from the embedding
        cache, which holds the shadow's vectors)."""
        return self.swap_alias(alias, self.shadow_of(alias), action="promote")

    def list_aliases(self) -> list[AliasRow]:
        return fetch_all(self.conn, "list_aliases", AliasRow)

    def list_versions(self, index: str) -> list[VersionListing]:
        """Every version of ``index``, newest first, with its roles."""
        return fetch_all(self.conn, "list_versions", VersionListing, {"index": index})

    def mark_removed(self, index: str, versions: Sequence[str]) -> list[str]:
        """Mark versions removed unless an alias serves them (serialized with alias moves)."""
        removed = []
        with self.conn.transaction():
            self.conn.execute(q("lock_index_aliases"), {"index": index})
            for version in versions:
                if self.conn.execute(q("mark_removed"), {"version": version}).fetchone():
                    removed.append(version)
        return removed

    def gc_rows(self, index: str, min_seq: int) -> int:
        """Delete chunk rows that no retained version (all of seq >= min_seq) contains."""
        params = {"index": index, "min_seq": min_seq}
        with self.conn.transaction():
            retired = self.conn.execute(q("gc_retired_rows"), params).rowcount
            discarded = self.conn.execute(q("gc_discarded_rows"), params).rowcount
            shadow = self.conn.execute(q("gc_shadow_rows"), {"index": index}).rowcount
            self.conn.execute(q("gc_shadow_excluded"), {"index": index})
        return retired + discarded + shadow

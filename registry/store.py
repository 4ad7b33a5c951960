"""The doc-chunk registry: documents, chunk placements, the embedding cache and runs in PostgreSQL.

The registry package is the only code that speaks SQL. Writes that change what the index serves
happen in one transaction (:meth:`Registry.publish`); embeddings are committed batch by batch so that
a crash loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from registry import db
from registry.config import RegistryConfig
from registry.errors import ConnectionLost, IndexLocked, RunNotRunning
from registry.queries import fetch_all, fetch_one, q
from registry.rows import ChunkRow, RunListing, RunRow
from registry.feedback import FeedbackStore
from registry.rollout import RolloutStore
from registry.source_objects import SourceObjectStore
from registry.versions import VersionStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DocumentState(NamedTuple):
    """What the registry knows of one document, enough to plan the next run (a tuple: cheap by 100,000s)."""

    doc_id: str
    content_hash: str
    metadata_hash: str
    chunker_version: str
    status: str
    chunk_count: int


class CacheCollection(NamedTuple):
    """What a cache gc deleted: entries, and the bytes of their vectors."""

    entries: int
    bytes: int


class Registry(VersionStore, RolloutStore, SourceObjectStore, FeedbackStore):
    """A connection to the registry database.

    Use :meth:`open` to connect (starting the embedded server and migrating on first use).
    The connection runs in autocommit mode; every multi-statement write is an explicit transaction.

    When the server drops the connection (a restart, a failover, an idle kill), the statement in
    flight fails and the next use reconnects, with backoff (``reconnect_backoff``); a connection
    idle for ``ping_after`` seconds is checked before its next use, so a drop while idle costs
    nothing. Only :meth:`read` runs a statement again, and only idempotent reads go through it; a
    transaction lost mid-way fails with the error that found the drop (transient), and its block
    ends before anything reconnects. A connection that held the index lock is never silently
    replaced: the lock went with it, so every use raises :class:`ConnectionLost` until the
    :meth:`index_lock` block ends.
    """

    reconnect_backoff = db.Backoff()
    ping_after = 1.0

    def __init__(self, conn: psycopg.Connection, url: str, home: Path = Path(".ragpipe")) -> None:
        self._conn = conn
        self.url = url
        self.home = home
        self._locks: set[str] = set()  # index locks this session holds: lost with the connection
        self._lost_locks: set[str] = set()  # index locks a dropped connection took with it
        self._used = time.monotonic()

    @classmethod
    def open(cls, config: RegistryConfig | None = None, *, migrate: bool = True) -> "Registry":
        """Connect to the configured registry.

        Args:
            config: where the registry lives; defaults to the environment.
            migrate: apply pending migrations first.

        Raises:
            RegistryUnavailable: the database cannot be reached.
        """
        config = config or RegistryConfig.from_env()
        url = db.resolve_database_url(config.database_url, config.home)
        if migrate:
            db.ensure_schema(url)
        return cls(db.connect(url, autocommit=True), url, config.home)

    @property
    def conn(self) -> psycopg.Connection:
        """The live connection, reopened (with backoff) when the server dropped the last one.

        Raises:
            ConnectionLost: the dropped connection held an index lock (the block holding it must end).
            RegistryUnavailable: the server stayed unreachable for the whole backoff budget.
        """
        now = time.monotonic()
        if now - self._used >= self.ping_after:
            self._ping()
        self._used = now
        if self._conn.broken:
            self._lost_locks |= self._locks
            self._locks.clear()
            if not self._lost_locks:
                logger.warning("registry connection lost; reconnecting")
                self._conn = db.connect_with_backoff(self.url, self.reconnect_backoff)
        if self._lost_locks:
            raise ConnectionLost(
                f"lost the connection to the registry database while holding the index lock of "
                f"{', '.join(sorted(self._lost_locks))!r}; the lock went with it, so this run stopped; "
                f"retry: the next run finishes its work"
            )
        return self._conn

    def _ping(self) -> None:
        """Check an idle connection between transactions (inside one, the statement finds a drop)."""
        if self._conn.closed or self._conn.info.transaction_status != TransactionStatus.IDLE:
            return
        try:
            self._conn.execute(q("ping"))
        except psycopg.OperationalError:
            if not self._conn.broken:
                raise
            logger.warning("registry connection found dropped after %.1f s idle", time.monotonic() - self._used)

    @property
    def connected(self) -> bool:
        """Whether the connection is usable now, without reconnecting (for best-effort bookkeeping)."""
        return not self._conn.closed and not self._lost_locks

    def read(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an idempotent read (a method of this registry); when the server drops the connection
        under it, reconnect and run it again. Under an index lock the drop raises :class:`ConnectionLost`.
        """
        try:
            return query(*args, **kwargs)
        except psycopg.OperationalError:
            if not self._conn.broken:
                raise  # the server answered with an error: not a lost connection
            logger.warning("registry connection lost during a read; reconnecting to read again")
            _ = self.conn  # reconnects, or raises ConnectionLost under a lock
            return query(*args, **kwargs)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def index_lock(self, index: str, timeout_s: float) -> Iterator[None]:
        """Hold the publisher lock of ``index`` (a session advisory lock) for the block.

        Raises:
            IndexLocked: another process held it for ``timeout_s`` seconds.
            ConnectionLost: the connection, and with it the lock, was lost inside the block.
        """
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            row = self.conn.execute(q("try_index_lock"), {"index": index}).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise IndexLocked(
                    f"index {index!r} is being updated by another process; waited {timeout_s:g} s, nothing changed"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        self._locks.add(index)
        try:
            yield
        finally:
            held = index in self._locks
            self._locks.discard(index)
            self._lost_locks.discard(index)  # the block that lost it is over: the registry may reconnect
            if held and not self._conn.closed:
                try:
                    self._conn.execute(q("release_index_lock"), {"index": index})
                except psycopg.OperationalError:
                    if not self._conn.broken:
                        raise
                    logger.warning("registry connection lost while releasing the lock of index %r; "
                                   "the server released it", index)

    @contextlib.contextmanager
    def merge_claim(self, index: str) -> Iterator[None]:
        """Hold, for the block, the claim of a compaction that writes segments no version lists yet:
        gc removes no unlisted segment meanwhile (:meth:`segment_sweep`). A session advisory lock,
        shared among compactions: a killed process's claim ends with its connection."""
        self.conn.execute(q("hold_merge_claim"), {"index": index})
        try:
            yield
        finally:
            if not self._conn.closed and not self._conn.broken:
                self._conn.execute(q("release_merge_claim"), {"index": index})

    @contextlib.contextmanager
    def segment_sweep(self, index: str) -> Iterator[bool]:
        """Whether unlisted segments of ``index`` may be removed now (no compaction holds its claim);
        while the block runs, no compaction starts writing."""
        row = self.conn.execute(q("try_segment_sweep"), {"index": index}).fetchone()
        free = bool(row and row[0])
        try:
            yield free
        finally:
            if free and not self._conn.closed and not self._conn.broken:
                self._conn.execute(q("end_segment_sweep"), {"index": index})

    # -- documents and runs --------------------------------------------------------------------

    def document_states(self, index: str) -> dict[str, DocumentState]:
        """Return every document the index has seen, active or deleted, by doc_id."""
        with self.conn.cursor() as cur:
            cur.execute(q("document_states"), {"index": index})
            make = DocumentState._make
            return {row[0]: make(row) for row in cur.fetchall()}

    def start_run(self, index: str, source: str, *, owner: str = "cli", lease_s: float | None = None) -> int:
        """Record a new run; call it while holding the index lock.

        Args:
            owner: who runs it. A new run of an owner takes over that owner's unfinished runs.
            lease_s: reserve the index for this run for so long without holding the lock (runs
                whose steps execute in separate processes); each step renews it.

        Raises:
            IndexLocked: a run of another owner holds a live lease on the index.

        Other runs of the index still marked 'running' belong to processes that died (they would
        hold the lock or a lease otherwise), or to this owner: they are marked failed here.
        """
        with self.conn.transaction():
            busy = self.conn.execute(q("live_lease"), {"index": index, "owner": owner}).fetchone()
            if busy:
                raise IndexLocked(
                    f"index {index!r} is being updated by run {busy[0]} ({busy[1]}), reserved until "
                    f"{busy[2]:%Y-%m-%d %H:%M:%S %Z}; nothing changed"
                )
            row = self.conn.execute(
                q("insert_run"), {"index": index, "source": source, "owner": owner, "lease_s": lease_s}
            ).fetchone()
            assert row is not None
            run_id = int(row[0])
            self.conn.execute(q("abandon_runs"), {"index": index, "run_id": run_id})
        return run_id

    def renew_lease(self, run_id: int, lease_s: float) -> tuple[str, dict[str, Any] | None]:
        """Extend a running run's lease; return (index, saved state).

        Raises:
            RunNotRunning: the run finished, failed, or was taken over by a newer run.
        """
        row = self.conn.execute(q("renew_lease"), {"run_id": run_id, "lease_s": lease_s}).fetchone()
        if row is None:
            run = self.get_run(run_id)
            if run is None:
                raise RunNotRunning(f"run {run_id} does not exist")
            reason = f": {run.error}" if run.error else ""
            raise RunNotRunning(f"run {run_id} is {run.status}{reason}")
        return str(row[0]), row[1]

    def save_run_state(self, run_id: int, state: dict[str, Any]) -> None:
        self.conn.execute(q("save_run_state"), {"run_id": run_id, "state": Jsonb(state)})

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        counts: dict[str, Any],
        stage_seconds: dict[str, float],
        skipped: list[dict[str, str]],
        error: str | None = None,
    ) -> None:
        self.conn.execute(
            q("finish_run"),
            {
                "run_id": run_id,
                "status": status,
                "counts": Jsonb(counts),
                "stage_seconds": Jsonb(stage_seconds),
                "skipped": Jsonb(skipped),
                "error": error,
            },
        )

    def list_runs(self, index: str, limit: int = 10) -> list[RunListing]:
        """The newest runs of ``index``, newest first."""
        return fetch_all(self.conn, "list_runs", RunListing, {"index": index, "limit": limit})

    def get_run(self, run_id: int) -> RunRow | None:
        return fetch_one(self.conn, "get_run", RunRow, {"run_id": run_id})

    # -- embedding cache -----------------------------------------------------------------------

    def missing_embeddings(self, model_id: str, chunk_hashes: Sequence[str]) -> list[str]:
        """Return the hashes (in input order, deduplicated) with no cached vector for ``model_id``."""
        unique = list(dict.fromkeys(chunk_hashes))
        if not unique:
            return []
        # the shared lock first, the lookup in a statement of its own (a snapshot taken after it):
        # a cache gc either finished before (its deletions are seen, those texts are embedded again)
        # or starts after, when the rows staged before this lookup protect what it found
        with self.conn.transaction():
            self.conn.execute(q("share_embedding_cache"))
            rows = self.conn.execute(q("missing_embeddings"), {"hashes": unique, "model_id": model_id}).fetchall()
        missing = {row[0] for row in rows}
        return [h for h in unique if h in missing]

    def collect_embeddings(self, min_age_s: float) -> CacheCollection:
        """Delete cache entries older than ``min_age_s`` that no retained version of any index uses
        with the entry's model (serialized with cache lookups, see :meth:`missing_embeddings`)."""
        with self.conn.transaction():
            self.conn.execute(q("lock_embedding_cache"))
            row = self.conn.execute(q("collect_embeddings"), {"min_age_s": min_age_s}).fetchone()
        assert row is not None
        return CacheCollection(entries=int(row[0]), bytes=int(row[1]))

    def store_embeddings(self, model_id: str, chunk_hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Insert vectors into the cache and commit (existing entries are kept as they are)."""
        if len(chunk_hashes) != len(vectors):
            raise ValueError(f"{len(chunk_hashes)} hashes but {len(vectors)} vectors")
        matrix = np.ascontiguousarray(vectors, dtype="<f4")
        dim = int(matrix.shape[1])
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(q("create_stage_embeddings"))
            with cur.copy(q("copy_stage_embeddings")) as copy:
                for chunk_hash, row in zip(chunk_hashes, matrix):
                    copy.write_row((chunk_hash, dim, row.tobytes()))
            cur.execute(q("merge_embeddings"), {"model_id": model_id})

    def fetch_embeddings(self, model_id: str, chunk_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Return cached vectors by chunk hash (hashes with no vector are absent)."""
        out: dict[str, np.ndarray] = {}
        with self.conn.cursor() as cur:
            cur.execute(q("fetch_embeddings"), {"model_id": model_id, "hashes": list(chunk_hashes)})
            for chunk_hash, blob in cur:
                out[chunk_hash] = np.frombuffer(blob, dtype="<f4")
        return out

    # -- reading the live state ----------------------------------------------------------------

    def active_chunk_ids(self, index: str) -> set[str]:
        with self.conn.cursor() as cur:
            cur.execute(q("active_chunk_ids"), {"index": index})
            return {row[0] for row in cur}

    def active_chunks(self, index: str) -> list[ChunkRow]:
        return fetch_all(self.conn, "active_chunks", ChunkRow, {"index": index})

    def count_active_chunks(self, index: str) -> int:
        row = self.conn.execute(q("count_active_chunks"), {"index": index}).fetchone()
        return int(row[0]) if row else 0

    def refresh_statistics(self) -> None:
        """Analyze the chunk, document and embedding cache tables, so that the planner knows their size
        after a bulk load: without statistics it reads every row of an index for lookups of a few
        documents, and every cached vector of a model for a few thousand of them."""
        self.conn.execute(q("analyze_chunks"))

    def database_bytes(self) -> int:
        """The registry database's size on disk (benchmarks report it)."""
        row = self.conn.execute(q("database_size")).fetchone()
        return int(row[0]) if row else 0

    def active_chunks_of_deleted_documents(self, index: str) -> int:
        row = self.conn.execute(q("active_chunks_of_deleted_documents"), {"index": index}).fetchone()
        return int(row[0]) if row else 0


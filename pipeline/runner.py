"""The in-process runner: one incremental indexing pass, stage by stage, for the CLI and the tests.

discover ─► diff vs registry ─► chunk (new/changed only) ─► embed (cache misses only) ─► apply

Nothing the index serves changes before the final ``apply`` transaction; embeddings are cached
batch by batch before it, so a run killed at any point is finished by the next run without
embedding anything twice.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline import faults
from pipeline.chunking import Chunk, chunk_document, chunker_version
from pipeline.config import IndexConfig
from pipeline.diff import ChangeSet, plan_changes
from pipeline.embedding import Embedder, embed_in_batches
from pipeline.errors import UnsafeDeletion
from pipeline.sources import SourceScan, scan_source
from registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one run did; ``to_dict()`` is what ``ragpipe index --json`` prints."""

    run_id: int
    index: str
    source: str
    status: str = "running"
    version: str | None = None
    model_id: str = ""
    documents: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)
    embedding: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "index": self.index,
            "source": self.source,
            "status": self.status,
            "version": self.version,
            "model_id": self.model_id,
            "documents": self.documents,
            "chunks": self.chunks,
            "embedding": self.embedding,
            "skipped": self.skipped,
            "stage_seconds": self.stage_seconds,
            "error": self.error,
        }


class _Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)


def version_name(index: str, now: datetime | None = None) -> str:
    """Name of the version a run produces: the index and the UTC build time, to the millisecond."""
    now = now or datetime.now(timezone.utc)
    return f"{index}_{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", leave=False, file=sys.stderr)


def run_index(
    source: str | SourceScan,
    registry: Registry,
    embedder: Embedder,
    config: IndexConfig,
    *,
    progress: bool = False,
) -> RunSummary:
    """Run one incremental indexing pass of ``source`` into ``config.index``.

    Args:
        source: a directory, a ``.jsonl`` file, or an already scanned source (replays, tests).
        registry: the registry connection.
        embedder: the embedding model (its ``model_id`` keys the cache).
        config: index name, source filters, batch size, lock timeout.
        progress: show progress bars when stderr is a terminal.

    Returns:
        The run summary, also recorded in the ``runs`` table.

    Raises:
        IndexLocked: another run held the index for ``config.lock_timeout`` seconds; nothing changed.
        SourceUnavailable: the source cannot be read at all; nothing changed.
        UnsafeDeletion: the source is empty but the index is not (see ``allow_delete_all``).
    """
    stages = _Stages()
    source_label = source.source if isinstance(source, SourceScan) else str(source)
    with registry.index_lock(config.index, config.lock_timeout):
        run_id = registry.start_run(config.index, source_label)
        summary = RunSummary(run_id=run_id, index=config.index, source=source_label, model_id=embedder.model_id)
        try:
            _run(source, registry, embedder, config, summary, stages, progress)
            summary.status = "succeeded"
        except BaseException as exc:
            summary.status = "failed"
            summary.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            summary.stage_seconds = stages.seconds
            if not registry.conn.closed and not registry.conn.broken:
                registry.finish_run(
                    run_id,
                    status=summary.status,
                    counts={"documents": summary.documents, "chunks": summary.chunks, "embedding": summary.embedding,
                            "version": summary.version, "model_id": summary.model_id},
                    stage_seconds=summary.stage_seconds,
                    skipped=summary.skipped,
                    error=summary.error,
                )
    return summary


def _run(
    source: str | SourceScan,
    registry: Registry,
    embedder: Embedder,
    config: IndexConfig,
    summary: RunSummary,
    stages: _Stages,
    progress: bool,
) -> None:
    with stages.stage("discover"):
        if isinstance(source, SourceScan):
            scan = source
        else:
            scan = scan_source(
                source, include=config.include, exclude=config.exclude, max_bytes=config.max_document_bytes
            )
        summary.skipped = [s.to_dict() for s in scan.skipped]
        for skip in scan.skipped:
            logger.warning("skipped %s: %s", skip.doc_id, skip.reason)

    with stages.stage("diff"):
        known = registry.document_states(config.index)
        version_of_chunker = chunker_version(embedder.model_id, embedder.max_tokens)
        plan = plan_changes(known, scan.documents, version_of_chunker)
        _refuse_wiping(plan, scan, known, config)
    summary.documents = {
        "seen": len(scan.documents),
        "new": len(plan.new),
        "changed": len(plan.changed),
        "metadata_only": len(plan.metadata_only),
        "unchanged": len(plan.unchanged),
        "deleted": len(plan.deleted),
        "skipped": len(scan.skipped),
    }

    chunks: list[Chunk] = []
    chunk_counts: dict[str, int] = {}
    if plan.to_chunk:
        with stages.stage("chunk"):
            counter = embedder.token_counter()
            bar = _progress(len(plan.to_chunk), "chunking", progress)
            for doc in plan.to_chunk:
                doc_chunks = chunk_document(doc, counter, embedder.max_tokens)
                chunks.extend(doc_chunks)
                chunk_counts[doc.doc_id] = len(doc_chunks)
                if bar:
                    bar.update(1)
            if bar:
                bar.close()
    for doc in plan.metadata_only:
        chunk_counts[doc.doc_id] = known[doc.doc_id].chunk_count

    with stages.stage("embed"):
        summary.embedding = _embed_missing(chunks, registry, embedder, config, progress)

    with stages.stage("apply"):
        faults.checkpoint("before_apply")
        if plan.is_empty:
            summary.chunks = {"added": 0, "removed": 0, "kept": 0}
        else:
            summary.version = version_name(config.index)
            result = registry.apply_changes(
                index=config.index,
                run_id=summary.run_id,
                version=summary.version,
                documents=plan.to_write,
                chunk_counts=chunk_counts,
                chunker_version=version_of_chunker,
                rechunked_doc_ids=[d.doc_id for d in plan.to_chunk],
                chunks=chunks,
                deleted_doc_ids=plan.deleted,
            )
            summary.chunks = {
                "added": result.chunks_added,
                "removed": result.chunks_superseded + result.chunks_deleted,
                "kept": len(chunks) - result.chunks_added,
            }
        summary.chunks["active"] = registry.count_active_chunks(config.index)


def _refuse_wiping(plan: ChangeSet, scan: SourceScan, known: dict[str, Any], config: IndexConfig) -> None:
    if scan.documents or not plan.deleted or config.allow_delete_all:
        return
    raise UnsafeDeletion(
        f"source {scan.source} yielded no documents; refusing to delete all {len(plan.deleted)} documents of "
        f"index {config.index!r} (set allow_delete_all / --allow-delete-all if that is intended); nothing changed"
    )


def _embed_missing(
    chunks: list[Chunk], registry: Registry, embedder: Embedder, config: IndexConfig, progress: bool
) -> dict[str, int]:
    """Embed the chunk texts the cache lacks for this model; return the counts."""
    text_by_hash: dict[str, str] = {}
    for chunk in chunks:
        text_by_hash.setdefault(chunk.chunk_hash, chunk.text)
    missing = registry.missing_embeddings(embedder.model_id, list(text_by_hash))
    items = [(h, text_by_hash[h]) for h in missing]
    bar = _progress(len(items), "embedding", progress)

    def store(hashes: list[str], vectors: Any) -> None:
        registry.store_embeddings(embedder.model_id, hashes, vectors)
        faults.checkpoint("embed_batch_stored")

    chars = embed_in_batches(
        embedder, items, store, batch_size=config.batch_size, on_batch=bar.update if bar else None
    )
    if bar:
        bar.close()
    return {
        "chunks_embedded": len(items),
        "chunks_cached": len(text_by_hash) - len(items),
        "chars_embedded": chars,
    }


"""One incremental indexing run, as steps: plan ─► stage ─► embed ─► build ─► validate ─► publish ─► gc.

- plan: recover what killed runs left, discover the source, diff it against the registry;
- stage: chunk the new and changed documents, record the version's chunk rows as pending;
- embed: embed the chunk texts the cache lacks (cache misses only), batch by batch;
- build: the version's new segments and manifest; validate: the gate (``pipeline.build_stage``);
- publish: one transaction; gc: versions beyond the retention, segments none of the rest lists
  (``pipeline.upkeep``).

``run_index`` runs them in one process under the index lock (the CLI, tests, replays, upserts);
``pipeline.steps`` runs each in its own process for an orchestrator (the Airflow DAGs), with the
run's state saved in the registry between steps. Each stage takes the run's context (registry,
artifact store, embedder, configuration) and its state. Nothing the index serves changes before the
publish transaction; embeddings are cached batch by batch before it, so a run killed at any point
is finished by the next run without embedding anything twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.build_stage import EMBEDDED, KNOWN, build_run, segment_params, touched_docs, validate_run, written_rows
from pipeline.chunking import Chunk, chunk_document, chunker_version, indexed_text
from pipeline.config import IndexConfig
from pipeline.diff import ChangeSet, document_chunker, partial_scan, plan_changes
from pipeline.embedding import Embedder, embed_in_batches, model_lock_matches, prefixes_of
from pipeline.errors import ArtifactWriteError, UnsafeDeletion
from pipeline.formats.isolation import ExtractLimits
from pipeline.run_state import (RunContext, RunOptions, RunState, RunSummary, artifact_store, doc_record,
                                progress_bar, stage_timer, version_name)
from pipeline.segments.build import same_build_settings
from pipeline.sources import (ListingMemory, ListingUpdate, ObjectStoreCredentials, SourceDocument, SourceScan,
                              scan_source, source_label)
from pipeline.upkeep import collect_garbage, recover_unfinished
from registry import ChunkRow, Registry

logger = logging.getLogger(__name__)

BULK_SHARE = 0.2  # a publish that adds or retires more than this share of the index's rows analyzes its tables

__all__ = ["RunContext", "RunOptions", "RunState", "RunSummary", "artifact_store", "build_run", "collect_garbage",
           "embed_items", "embed_run", "gc_run", "missing_texts", "needed_rows", "plan_run", "publish_run",
           "recording", "recover_unfinished", "run_index", "stage_run", "start_run", "validate_run"]


def run_index(
    source: str | SourceScan,
    registry: Registry,
    embedder: Embedder,
    config: IndexConfig,
    *,
    progress: bool = False,
    options: RunOptions = RunOptions(),
    credentials: ObjectStoreCredentials | None = None,
) -> RunSummary:
    """Run one incremental indexing pass of ``source`` into ``config.index``, in this process.

    The steps are those an orchestrated run executes as separate tasks (see ``pipeline.steps``);
    here one process holds the index lock from the first to the last.

    Args:
        source: a directory, a ``.jsonl`` file, an object-store URI (``s3://bucket/prefix/``,
            ``gs://``, ``file://``), or an already scanned source (replays, upserts, tests).
        registry: the registry connection.
        embedder: the embedding model (its ``model_id`` keys the cache).
        config: index name, source filters, batch size, lock timeout.
        progress: show progress bars when stderr is a terminal.
        credentials: an S3 source's credentials; default: the standard AWS variables.

    Returns:
        The run summary, also recorded in the ``runs`` table.

    Raises:
        IndexLocked: another run held the index for ``config.lock_timeout`` seconds; nothing changed.
        SourceUnavailable: the source as a whole cannot be read; nothing changed.
        UnsafeDeletion: the source is empty but the index is not (see ``allow_delete_all``).
        VersionRejected: the new version failed validation; it was recorded as rejected, the alias
            did not move.
    """
    label = source.source if isinstance(source, SourceScan) else source_label(source)
    ctx = RunContext.of(registry, embedder, config)
    with registry.index_lock(config.index, config.lock_timeout):
        state = start_run(registry, config, label, embedder.model_id, options)
        with recording(registry, state):
            scan = plan_run(ctx, state, source, credentials)
            if state.changed:
                by_id = {d.doc_id: d for d in scan.documents}
                stage_run(ctx, state, [by_id[d] for d in state.to_chunk])
                del scan, by_id  # the texts are chunked and staged: the build reads the registry
                embed_run(ctx, state, progress)
                try:
                    build_run(ctx, state)
                except ArtifactWriteError as exc:  # this run ends here: its version goes, its embeddings stay
                    assert state.summary.version is not None and state.seq is not None
                    ctx.store.remove(config.index, state.summary.version)
                    registry.abandon_version(config.index, state.summary.version, state.seq, str(exc))
                    raise
                validate_run(ctx, state)
                publish_run(ctx, state)
                gc_run(ctx, state)
    return state.summary


def start_run(
    registry: Registry, config: IndexConfig, source: str, model_id: str, options: RunOptions = RunOptions(),
    *, owner: str = "cli", lease_s: float | None = None,
) -> RunState:
    """Record a new run of ``config.index`` (call while holding the index lock).

    Args:
        owner: who runs it; a new run of the same owner takes over that owner's unfinished runs.
        lease_s: for a run whose steps run in separate processes: how long the index stays reserved
            for it without the lock; each step renews the lease.
    """
    run_id = registry.start_run(config.index, source, owner=owner, lease_s=lease_s)
    summary = RunSummary(run_id=run_id, index=config.index, source=source, model_id=model_id)
    return RunState(summary=summary, options=options)


@contextmanager
def recording(
    registry: Registry, state: RunState, *, final: bool = True,
    keep_running: Callable[[BaseException], bool] = lambda exc: False,
) -> Iterator[None]:
    """Record the run's outcome when it ends: failed on an error (unless ``keep_running`` says the
    error leaves the run to a retry), succeeded after the ``final`` step."""
    summary = state.summary
    try:
        yield
        if final:
            summary.status = "succeeded"
    except BaseException as exc:
        if not keep_running(exc):
            summary.status = "failed"
            summary.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if summary.status != "running" and registry.connected:  # a lost connection: the next run records it
            registry.finish_run(
                summary.run_id,
                status=summary.status,
                counts={"documents": summary.documents, "chunks": summary.chunks, "embedding": summary.embedding,
                        "version": summary.version, "model_id": summary.model_id},
                stage_seconds=summary.stage_seconds,
                skipped=summary.skipped,
                error=summary.error,
            )


def plan_run(ctx: RunContext, state: RunState, source: str | SourceScan,
             credentials: ObjectStoreCredentials | None = None) -> SourceScan:
    """Recover what killed runs left, discover the source and diff it against the registry.

    An object-store source reads only the objects whose listing changed since the last run that
    succeeded; a run with nothing to do records the new listing here, one that publishes in
    :func:`publish_run`.

    Returns the scan (the documents with their texts); ``state`` records the plan.
    """
    summary, registry, embedder, config = state.summary, ctx.registry, ctx.embedder, ctx.config
    with stage_timer(state, "recover"):
        summary.recovered = recover_unfinished(registry, ctx.store, config.index)

    known = ctx.memo[KNOWN] = registry.document_states(config.index)  # validation reads it again
    state.chunker_version = chunker_version(embedder.model_id, embedder.max_tokens, prefixes_of(embedder).passage,
                                            config.chunk_context)
    with stage_timer(state, "discover"):
        if isinstance(source, SourceScan):
            scan = source
        else:
            memory = ListingMemory(lambda uri: registry.source_objects(config.index, uri), known,
                                   state.chunker_version)
            scan = scan_source(
                source, include=config.include, exclude=config.exclude, max_bytes=config.max_document_bytes,
                limits=ExtractLimits(timeout_s=config.extract_timeout, memory_mb=config.extract_memory_mb,
                                     max_unzipped_bytes=config.max_unzipped_bytes),
                memory=memory, credentials=credentials,
            )
        if state.options.partial:  # computed under the lock: a snapshot run's documents are all known here
            scan = partial_scan(scan, known, state.options.delete, config.index)
        state.listing = scan.listing.to_json() if scan.listing else None
        summary.skipped = [s.to_dict() for s in scan.skipped]
        for skip in summary.skipped:
            logger.warning("skipped %s: %s", skip["doc_id"], skip["reason"])

    with stage_timer(state, "diff"):
        delete = set(state.options.delete)  # a doc_id named twice for deletion is reported, and deleted
        plan = plan_changes(known, scan.documents, state.chunker_version,
                            unreadable=[s.doc_id for s in scan.skipped if not s.gone and s.doc_id not in delete],
                            unreadable_under=[s.under for s in scan.skipped if s.under is not None],
                            unread=scan.unread)
        if not state.options.delete:  # doc_ids named for deletion are meant, even the last one
            _refuse_wiping(plan, scan, known, config)
    summary.documents = {
        "seen": len(scan.documents) + len(scan.unread),
        "new": len(plan.new),
        "changed": len(plan.changed),
        "metadata_only": len(plan.metadata_only),
        "unchanged": len(plan.unchanged),
        "deleted": len(plan.deleted),
        "skipped": len(scan.skipped),
        "kept_on_error": len(plan.kept),
    }
    state.to_write = [doc_record(d) for d in plan.to_write]
    state.to_chunk = [d.doc_id for d in plan.to_chunk]
    state.deleted = list(plan.deleted)
    state.kept = list(plan.kept)
    state.chunk_counts = {d.doc_id: known[d.doc_id].chunk_count for d in plan.metadata_only}
    head = registry.head_version(config.index)
    # the first run builds even when empty; a changed model lock (prefixes) rebuilds unchanged documents
    if (plan.is_empty and head is None) or (head and not model_lock_matches(head.manifest, embedder, head.version)):
        state.options = replace(state.options, full=True)
    if not state.changed:
        summary.chunks = {"added": 0, "removed": 0, "kept": 0, "active": registry.count_active_chunks(config.index)}
        summary.embedding = {"chunks_embedded": 0, "chunks_cached": 0, "chars_embedded": 0}
        record_listing(ctx, state)
        state.step = "done"
    else:
        state.step = "planned"
    return scan


def stage_run(ctx: RunContext, state: RunState, documents: list[SourceDocument]) -> None:
    """Chunk ``documents`` (the plan's new and changed ones) and stage the version's chunk rows.

    Chunks go to the registry as they are cut, one document at a time: a full build never holds the
    corpus's chunks as Python objects (the ``chunk`` stage's seconds are the chunker's share of the
    staging)."""
    summary, registry, embedder, config = state.summary, ctx.registry, ctx.embedder, ctx.config
    counter = embedder.token_counter() if documents else None
    chunking = 0.0
    staged = 0

    def chunks() -> Iterator[Chunk]:
        nonlocal chunking, staged
        for doc in documents:
            started = time.perf_counter()
            doc_chunks = chunk_document(doc, counter, embedder.max_tokens, prefixes_of(embedder).passage,
                                        config.chunk_context)
            chunking += time.perf_counter() - started
            state.chunk_counts[doc.doc_id] = len(doc_chunks)
            staged += len(doc_chunks)
            yield from doc_chunks

    started = time.perf_counter()
    head = registry.head_version(config.index)
    parent_ok = (
        head is not None
        and head.model_id == embedder.model_id
        and model_lock_matches(head.manifest, embedder, head.version)
        and same_build_settings(head.manifest, segment_params(ctx, int((head.manifest or {}).get("dim", 0))))
        and ctx.store.exists(config.index, head.version)
    )
    summary.full_build = state.options.full or not parent_ok
    summary.version = version_name(config.index)
    state.parent = head.version if head else None
    state.seq = registry.create_version(
        index=config.index, version=summary.version, parent=state.parent,
        run_id=summary.run_id, model_id=embedder.model_id, full_build=summary.full_build,
    )
    state.added_rows, state.retired_rows = registry.stage_version(
        index=config.index, version=summary.version, seq=state.seq, run_id=summary.run_id, chunks=chunks(),
        valid_from=state.valid_from(), rechunked_doc_ids=state.to_chunk, deleted_doc_ids=state.deleted,
    )
    state.staged_chunks = staged
    seconds = summary.stage_seconds
    if documents:
        seconds["chunk"] = round(seconds.get("chunk", 0.0) + chunking, 4)
    seconds["stage"] = round(seconds.get("stage", 0.0) + time.perf_counter() - started - chunking, 4)
    faults.checkpoint("staged")
    state.step = "staged"


def needed_rows(registry: Registry, index: str, state: RunState) -> tuple[list[ChunkRow], list[ChunkRow]]:
    """(rows the build rewrites, rows whose vectors it needs): every member for a full build; for an
    incremental one the members of the touched documents, and the chunks the version adds."""
    assert state.seq is not None
    full = state.summary.full_build
    rows = registry.member_rows(index, state.seq, None if full else sorted(touched_docs(state)))
    if full:
        return rows, rows
    added, _removed = registry.version_changes(index, state.seq)
    by_key = {r.chunk_key: r for r in rows}
    return rows, [by_key[k] for k in added]


def _added_rows(ctx: RunContext, state: RunState) -> list[ChunkRow]:
    """The rows an incremental version adds (from the written documents' rows, read once)."""
    assert state.seq is not None
    added, _removed = ctx.registry.version_changes(ctx.index, state.seq)
    by_key = {r.chunk_key: r for r in written_rows(ctx, state)}
    return [by_key[k] for k in added]


def missing_texts(registry: Registry, model_id: str, rows: list[ChunkRow]) -> tuple[list[tuple[str, str]], int]:
    """((chunk hash, indexed text) of the rows the embedding cache lacks for ``model_id``, distinct texts)."""
    text_by_hash: dict[str, str] = {}
    for row in rows:
        text_by_hash.setdefault(row.chunk_hash, indexed_text(row.context, row.text))
    missing = registry.missing_embeddings(model_id, list(text_by_hash))
    return [(h, text_by_hash[h]) for h in missing], len(text_by_hash)


def embed_items(
    registry: Registry, embedder: Embedder, items: list[tuple[str, str]], batch_size: int, progress: bool = False,
    keep: dict[str, np.ndarray] | None = None,
) -> int:
    """Embed (chunk hash, text) pairs, storing each batch in the cache as soon as it exists; return
    the characters embedded. ``keep`` receives the vectors as the cache stores them, by chunk hash."""
    bar = progress_bar(len(items), "embedding", progress)

    def store(hashes: list[str], vectors: Any) -> None:
        registry.store_embeddings(embedder.model_id, hashes, vectors)
        faults.checkpoint("embed_batch_stored")
        if keep is not None:
            keep.update(zip(hashes, np.ascontiguousarray(vectors, dtype="<f4")))

    chars = embed_in_batches(embedder, items, store, batch_size=batch_size, on_batch=bar.update if bar else None)
    if bar:
        bar.close()
    return chars


def embed_run(ctx: RunContext, state: RunState, progress: bool) -> None:
    """Embed the chunk texts of the staged version that the cache lacks for this model; a full
    build's rows are read page by page."""
    registry, embedder = ctx.registry, ctx.embedder
    assert state.seq is not None
    with stage_timer(state, "embed"):
        keep = None
        if state.summary.full_build:
            pages: Any = registry.iter_member_rows(ctx.index, state.seq)
        else:  # a few vectors: the build takes them from here rather than reading them back
            pages, keep = [_added_rows(ctx, state)], ctx.memo.setdefault(EMBEDDED, {})
        embedded = distinct = chars = 0
        for page in pages:
            items, seen = missing_texts(registry, embedder.model_id, page)
            chars += embed_items(registry, embedder, items, ctx.config.batch_size, progress, keep)
            embedded, distinct = embedded + len(items), distinct + seen
        state.summary.embedding = {"chunks_embedded": embedded, "chunks_cached": distinct - embedded,
                                   "chars_embedded": chars}
    state.step = "embedded"


def publish_run(ctx: RunContext, state: RunState) -> dict[str, Any]:
    """Make the validated version live (or the alias's shadow) in one transaction."""
    summary, registry, config = state.summary, ctx.registry, ctx.config
    assert summary.version is not None and state.seq is not None
    with stage_timer(state, "publish"):
        documents = state.documents()
        move = registry.publish(
            index=config.index, alias=config.alias, version=summary.version, seq=state.seq, run_id=summary.run_id,
            documents=documents, chunk_counts=state.chunk_counts,
            chunker_versions={d.doc_id: document_chunker(state.chunker_version, d) for d in documents},
            valid_from=state.valid_from(), deleted_doc_ids=state.deleted, shadow=state.options.shadow,
            before_commit=lambda: faults.checkpoint("publishing"),
        )
        summary.alias = {"alias": move.alias, "version": move.version, "previous": move.previous,
                         "action": move.action}
        # a published version's chunks are the index's active rows (validation checked them against
        # the registry): counting the rows again would read every row of the index
        active = state.version_chunks
        if active is None or state.options.shadow:
            active = registry.count_active_chunks(config.index)
        summary.chunks = {"added": state.added_rows, "removed": state.retired_rows,
                          "kept": state.staged_chunks - state.added_rows, "active": active}
        if state.added_rows + state.retired_rows > BULK_SHARE * max(active, 1):
            registry.refresh_statistics()  # a bulk load: later runs' lookups of a few documents need them
        if not state.options.shadow:  # a shadow leaves the documents as they were: and their listing
            record_listing(ctx, state)
    state.step = "published"
    return summary.alias


def record_listing(ctx: RunContext, state: RunState) -> None:
    """Remember what an object-store source listed, once the documents it read are the index's.

    After the publish transaction, not in it: a crash between the two leaves the old listing, and
    the next run reads those objects again and finds them unchanged.
    """
    if state.listing is None:
        return
    update = ListingUpdate.from_json(state.listing)
    ctx.registry.record_source_objects(ctx.index, update.source, update.record, update.forget)


def gc_run(ctx: RunContext, state: RunState) -> dict[str, Any]:
    with stage_timer(state, "gc"):
        state.summary.gc = collect_garbage(ctx.registry, ctx.store, ctx.index, ctx.config.retention,
                                           sweep_rows=False)
    state.step = "done"
    return state.summary.gc


def _refuse_wiping(plan: ChangeSet, scan: SourceScan, known: dict[str, Any], config: IndexConfig) -> None:
    if scan.documents or scan.unread or not plan.deleted or config.allow_delete_all:
        return
    raise UnsafeDeletion(
        f"source {scan.source} yielded no documents; refusing to delete all {len(plan.deleted)} documents of "
        f"index {config.index!r} (set allow_delete_all / --allow-delete-all if that is intended); nothing changed"
    )

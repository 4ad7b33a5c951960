"""One incremental indexing run, as steps: plan ─► stage ─► embed ─► build ─► validate ─► publish ─► gc.

- plan: recover what killed runs left, discover the source, diff it against the registry;
- stage: chunk the new and changed documents, record the version's chunk rows as pending;
- embed: embed the chunk texts the cache lacks (cache misses only), batch by batch;
- build: the version's files, from its parent's; validate: the gate; publish: one transaction;
  gc: versions beyond the retention.

``run_index`` runs them in one process under the index lock (the CLI, tests, replays);
``pipeline.steps`` runs each in its own process for an orchestrator (the Airflow DAGs), with the
run's state saved in the registry between steps. Nothing the index serves changes before the
publish transaction; embeddings are cached batch by batch before it, so a run killed at any point
is finished by the next run without embedding anything twice.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline import faults
from retrieval.artifacts import MANIFEST_FORMAT, ArtifactStore, WriteFailed
from retrieval.onnx import EncoderRef
from pipeline.building import BuildPlan, HnswParams, build_version
from pipeline.chunking import Chunk, chunk_document, chunker_version, indexed_text
from pipeline.config import IndexConfig
from pipeline.diff import ChangeSet, document_chunker, plan_changes
from pipeline.embedding import (Embedder, embed_in_batches, model_lock_matches, model_record, prefixes_of,
                                query_embedding)
from pipeline.errors import ArtifactWriteError, EmbeddingError, UnsafeDeletion, VersionRejected
from pipeline.formats.isolation import ExtractLimits
from pipeline.sources import (ListingMemory, ListingUpdate, ObjectStoreCredentials, SourceDocument, SourceScan,
                              scan_source, source_label)
from pipeline.validation import Thresholds, validate_version
from registry import ChunkRow, DocumentFields, Registry
from retrieval.bm25 import ANALYZER_VERSION

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
    full_build: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    alias: dict[str, Any] | None = None
    gc: dict[str, Any] = field(default_factory=dict)
    recovered: list[str] = field(default_factory=list)

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
            "full_build": self.full_build,
            "metrics": self.metrics,
            "alias": self.alias,
            "gc": self.gc,
            "recovered": self.recovered,
        }


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices (flags of ``ragpipe index``), as opposed to the index's configuration.

    Attributes:
        full: rebuild the version from the registry instead of from the head version's files.
        shadow: attach the version to the alias as its shadow instead of publishing it.
    """

    full: bool = False
    shadow: bool = False


def version_name(index: str, now: datetime | None = None) -> str:
    """Name of the version a run produces: the index and the UTC build time, to the millisecond."""
    now = now or datetime.now(timezone.utc)
    return f"{index}_{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from registry.extras import require

    tqdm = require("tqdm", "pipeline", "the progress bar").tqdm
    return tqdm(total=total, desc=desc, unit="chunk", leave=False, file=sys.stderr)


@dataclass
class RunState:
    """What one run has decided and done so far, so that its steps can run in separate processes.

    The in-process runner keeps it in memory; orchestrated runs (``pipeline.steps``, the Airflow
    DAGs) save it in the run's registry row after each step and load it in the next. It holds ids,
    hashes and counts, never document texts, chunks or vectors.
    """

    summary: RunSummary
    options: RunOptions = RunOptions()
    chunker_version: str = ""
    seq: int | None = None  # the staged version's sequence number
    parent: str | None = None
    to_write: list[dict[str, Any]] = field(default_factory=list)  # new, changed, metadata-only documents
    to_chunk: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    chunk_counts: dict[str, int] = field(default_factory=dict)
    staged_chunks: int = 0
    to_embed: int = 0  # orchestrated runs: chunk texts handed to embedding tasks
    cached_before: int = 0  # orchestrated runs: chunk texts already in the cache when staged
    batches: list[str] = field(default_factory=list)  # orchestrated runs: the embedding work lists' URIs
    listing: dict[str, Any] | None = None  # object stores: what to record of the listing once the run succeeded
    added_rows: int = 0
    retired_rows: int = 0
    step: str = "started"  # the last step finished: planned, staged, embedded, built, validated, published, done
    built_index: Any = field(default=None, repr=False, compare=False)  # in-process: the graph just built
    fetched_rows: Any = field(default=None, repr=False, compare=False)  # in-process: rows embed read, build reuses

    @property
    def changed(self) -> bool:
        return bool(self.to_write or self.deleted or self.options.full)

    def documents(self) -> list[SourceDocument]:
        """The documents to write, without their texts (what publishing records)."""
        return [SourceDocument(d["doc_id"], "", d["source_uri"], d["format"], d["metadata"], d["content_hash"],
                               d["metadata_hash"], _parse_time(d["valid_from"]), extraction=d.get("extraction", ""))
                for d in self.to_write]

    def valid_from(self) -> dict[str, datetime | None]:
        return {d["doc_id"]: _parse_time(d["valid_from"]) for d in self.to_write}

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("summary", "options", "built_index", "fetched_rows")}
        options = {"full": self.options.full, "shadow": self.options.shadow}
        return {**out, "summary": self.summary.to_dict(), "options": options}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunState":
        data = dict(data)
        summary = RunSummary(**data.pop("summary"))
        return cls(summary=summary, options=RunOptions(**data.pop("options")), **data)


def _doc_record(doc: SourceDocument) -> dict[str, Any]:
    return {"doc_id": doc.doc_id, "source_uri": doc.source_uri, "format": doc.format, "metadata": doc.metadata,
            "content_hash": doc.content_hash, "metadata_hash": doc.metadata_hash,
            "valid_from": doc.valid_from.isoformat() if doc.valid_from else None, "extraction": doc.extraction}


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


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
            ``gs://``, ``file://``), or an already scanned source (replays, tests).
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
    with registry.index_lock(config.index, config.lock_timeout):
        state = start_run(registry, config, label, embedder.model_id, options)
        with recording(registry, state):
            scan = plan_run(registry, embedder, config, state, source, credentials)
            if state.changed:
                by_id = {d.doc_id: d for d in scan.documents}
                stage_run(registry, embedder, config, state, [by_id[d] for d in state.to_chunk])
                embed_run(registry, embedder, config, state, progress)
                try:
                    build_run(registry, embedder, config, state)
                except ArtifactWriteError as exc:  # this run ends here: its version goes, its embeddings stay
                    assert state.summary.version is not None and state.seq is not None
                    artifact_store(config, registry.home).remove(config.index, state.summary.version)
                    registry.abandon_version(config.index, state.summary.version, state.seq, str(exc))
                    raise
                validate_run(registry, embedder, config, state)
                publish_run(registry, config, state)
                gc_run(registry, config, state)
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


@contextmanager
def _stage(state: RunState, name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = state.summary.stage_seconds
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 4)


def plan_run(
    registry: Registry, embedder: Embedder, config: IndexConfig, state: RunState, source: str | SourceScan,
    credentials: ObjectStoreCredentials | None = None,
) -> SourceScan:
    """Recover what killed runs left, discover the source and diff it against the registry.

    An object-store source reads only the objects whose listing changed since the last run that
    succeeded; a run with nothing to do records the new listing here, one that publishes in
    :func:`publish_run`.

    Returns the scan (the documents with their texts); ``state`` records the plan.
    """
    summary = state.summary
    store = artifact_store(config, registry.home)
    with _stage(state, "recover"):
        summary.recovered = recover_unfinished(registry, store, config.index)

    known = registry.document_states(config.index)
    state.chunker_version = chunker_version(embedder.model_id, embedder.max_tokens, prefixes_of(embedder).passage,
                                            config.chunk_context)
    with _stage(state, "discover"):
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
        state.listing = scan.listing.to_json() if scan.listing else None
        summary.skipped = [s.to_dict() for s in scan.skipped]
        for skip in summary.skipped:
            logger.warning("skipped %s: %s", skip["doc_id"], skip["reason"])

    with _stage(state, "diff"):
        plan = plan_changes(known, scan.documents, state.chunker_version,
                            unreadable=[s.doc_id for s in scan.skipped if not s.gone],
                            unreadable_under=[s.under for s in scan.skipped if s.under is not None],
                            unread=scan.unread)
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
    state.to_write = [_doc_record(d) for d in plan.to_write]
    state.to_chunk = [d.doc_id for d in plan.to_chunk]
    state.deleted = list(plan.deleted)
    state.kept = list(plan.kept)
    state.chunk_counts = {d.doc_id: known[d.doc_id].chunk_count for d in plan.metadata_only}
    head = registry.head_version(config.index)
    # the first run builds even when empty; a changed model lock (prefixes) rebuilds unchanged documents
    if (plan.is_empty and head is None) or (head and not model_lock_matches(head.manifest, embedder, head.version)):
        state.options = RunOptions(full=True, shadow=state.options.shadow)
    if not state.changed:
        summary.chunks = {"added": 0, "removed": 0, "kept": 0, "active": registry.count_active_chunks(config.index)}
        summary.embedding = {"chunks_embedded": 0, "chunks_cached": 0, "chars_embedded": 0}
        record_listing(registry, config, state)
        state.step = "done"
    else:
        state.step = "planned"
    return scan


def stage_run(
    registry: Registry, embedder: Embedder, config: IndexConfig, state: RunState, documents: list[SourceDocument],
) -> None:
    """Chunk ``documents`` (the plan's new and changed ones) and stage the version's chunk rows."""
    summary = state.summary
    store = artifact_store(config, registry.home)
    chunks: list[Chunk] = []
    if documents:
        with _stage(state, "chunk"):
            counter = embedder.token_counter()
            for doc in documents:
                doc_chunks = chunk_document(doc, counter, embedder.max_tokens, prefixes_of(embedder).passage,
                                            config.chunk_context)
                chunks.extend(doc_chunks)
                state.chunk_counts[doc.doc_id] = len(doc_chunks)

    with _stage(state, "stage"):
        head = registry.head_version(config.index)
        parent_ok = (
            head is not None
            and head.model_id == embedder.model_id
            and model_lock_matches(head.manifest, embedder, head.version)
            and _same_build_settings(head.manifest or {}, config)
            and store.exists(config.index, head.version)
        )
        summary.full_build = state.options.full or not parent_ok
        summary.version = version_name(config.index)
        state.parent = head.version if head else None
        state.seq = registry.create_version(
            index=config.index, version=summary.version, parent=state.parent,
            run_id=summary.run_id, model_id=embedder.model_id, full_build=summary.full_build,
        )
        state.added_rows, state.retired_rows = registry.stage_version(
            index=config.index, version=summary.version, seq=state.seq, run_id=summary.run_id, chunks=chunks,
            valid_from=state.valid_from(), rechunked_doc_ids=state.to_chunk, deleted_doc_ids=state.deleted,
        )
        state.staged_chunks = len(chunks)
        faults.checkpoint("staged")
    state.step = "staged"


def _touched(state: RunState) -> set[str]:
    return {d["doc_id"] for d in state.to_write} | set(state.deleted)


def needed_rows(registry: Registry, index: str, state: RunState) -> tuple[list[ChunkRow], list[ChunkRow]]:
    """(rows the build rewrites, rows whose vectors it needs): every member for a full build; for an
    incremental one the members of the touched documents, and the chunks the version adds."""
    assert state.seq is not None
    if state.fetched_rows is not None:
        return state.fetched_rows  # type: ignore[no-any-return]
    full = state.summary.full_build
    rows = registry.member_rows(index, state.seq, None if full else sorted(_touched(state)))
    if full:
        state.fetched_rows = rows, rows
    else:
        added, _removed = registry.version_changes(index, state.seq)
        by_key = {r.chunk_key: r for r in rows}
        state.fetched_rows = rows, [by_key[k] for k in added]
    return state.fetched_rows  # type: ignore[no-any-return]


def missing_texts(registry: Registry, model_id: str, rows: list[ChunkRow]) -> tuple[list[tuple[str, str]], int]:
    """((chunk hash, indexed text) of the rows the embedding cache lacks for ``model_id``, distinct texts)."""
    text_by_hash: dict[str, str] = {}
    for row in rows:
        text_by_hash.setdefault(row.chunk_hash, indexed_text(row.context, row.text))
    missing = registry.missing_embeddings(model_id, list(text_by_hash))
    return [(h, text_by_hash[h]) for h in missing], len(text_by_hash)


def embed_items(
    registry: Registry, embedder: Embedder, items: list[tuple[str, str]], batch_size: int, progress: bool = False,
) -> int:
    """Embed (chunk hash, text) pairs, storing each batch in the cache as soon as it exists; return
    the characters embedded."""
    bar = _progress(len(items), "embedding", progress)

    def store(hashes: list[str], vectors: Any) -> None:
        registry.store_embeddings(embedder.model_id, hashes, vectors)
        faults.checkpoint("embed_batch_stored")

    chars = embed_in_batches(embedder, items, store, batch_size=batch_size, on_batch=bar.update if bar else None)
    if bar:
        bar.close()
    return chars


def embed_run(registry: Registry, embedder: Embedder, config: IndexConfig, state: RunState, progress: bool) -> None:
    """Embed the chunk texts of the staged version that the cache lacks for this model."""
    with _stage(state, "embed"):
        _rows, needed = needed_rows(registry, config.index, state)
        items, distinct = missing_texts(registry, embedder.model_id, needed)
        chars = embed_items(registry, embedder, items, config.batch_size, progress)
        state.summary.embedding = {"chunks_embedded": len(items), "chunks_cached": distinct - len(items),
                                   "chars_embedded": chars}
    state.step = "embedded"


def build_run(registry: Registry, embedder: Embedder, config: IndexConfig, state: RunState) -> str:
    """Build the staged version's files from its parent's (or from the registry alone); return their URI."""
    summary = state.summary
    assert summary.version is not None and state.seq is not None
    store = artifact_store(config, registry.home)
    with _stage(state, "build"):
        rows, needed = needed_rows(registry, config.index, state)
        state.fetched_rows = None
        added_keys, removed_keys = registry.version_changes(config.index, state.seq)
        hashes = list({r.chunk_hash for r in needed})
        vectors = registry.fetch_embeddings(embedder.model_id, hashes)
        missing = set(hashes) - set(vectors)
        if missing:
            raise EmbeddingError(f"version {summary.version}: {len(missing)} chunk texts have no cached embedding "
                                 f"for {embedder.model_id} (embed step incomplete)")
        parent = registry.get_version(state.parent) if state.parent else None
        if vectors:
            dim = len(next(iter(vectors.values())))
        elif not summary.full_build and parent and parent.manifest:
            dim = int(parent.manifest["model"]["dim"])  # same model as the parent: nothing new to embed
        else:
            dim = embedder.dim
        full = summary.full_build
        doc_fields = registry.document_fields(config.index) if full else {}
        for doc_id in state.deleted:
            doc_fields.pop(doc_id, None)
        doc_fields.update({d.doc_id: DocumentFields(d.doc_id, d.source_uri, d.metadata, d.valid_from)
                           for d in state.documents()})
        build_plan = BuildPlan(
            index=config.index, version=summary.version, parent_version=state.parent,
            parent_dir=None if full else store.local_path(config.index, state.parent),  # type: ignore[arg-type]
            run_id=summary.run_id, model_id=embedder.model_id, dim=dim, chunker_version=state.chunker_version,
            rows=rows, added_keys=added_keys, removed_keys=removed_keys, touched_docs=_touched(state),
            doc_fields=doc_fields, vectors=vectors,
            hnsw=HnswParams(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction),
            model_record=model_record(embedder),
        )
        store.remove(config.index, summary.version)  # what an earlier attempt of this step left
        try:
            build_plan.encoder = query_encoder(store, embedder, registry.home / "cache")
            with store.writing(config.index, summary.version) as out:
                manifest, state.built_index = build_version(out, build_plan)
        except WriteFailed as exc:  # a failed read (of the parent's files, say) stays what it is
            raise ArtifactWriteError(_write_failure(exc, summary.version, store.uri)) from exc
        uri = store.version_uri(config.index, summary.version)
        registry.mark_version_built(summary.version, uri, manifest)
    state.step = "built"
    return uri


def query_encoder(store: ArtifactStore, embedder: Embedder, cache_dir: Path) -> EncoderRef | None:
    """Store the query encoder of ``embedder``'s model (once per content digest) and return its reference."""
    from pipeline.encoders import encoder_bundle, store_encoder

    bundle = encoder_bundle(embedder, cache_dir)
    return store_encoder(store, bundle) if bundle is not None else None


def _stored_encoder(store: ArtifactStore, version: str, index: str, model_id: str,
                    home: Path) -> Callable[[], Callable[[list[str]], Any]] | None:
    """What loads the query encoder the version's manifest names, as a retriever would (None: none)."""
    encoder = store.read_manifest(index, version)["model"].get("encoder")
    if encoder is None:
        return None

    def load() -> Callable[[list[str]], Any]:
        from retrieval.onnx import OnnxEncoder

        stored = OnnxEncoder.from_store(store.uri, EncoderRef.from_dict(encoder), model_id, home / "cache")
        return lambda texts: stored.embed([stored.spec.passage_prefix + t for t in texts])  # as documents were

    return load


def _write_failure(exc: OSError, version: str, root: str) -> str:
    """What an operator reads when a version's files could not be written."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (f"{'disk full' if full else 'write failed'}: cannot write {exc.filename or root} for version {version} "
            f"({exc.strerror or exc}); alias unchanged; {'free space under ' + root if full else 'fix it'} and "
            f"rerun (the embeddings made so far are cached)")


def validate_run(registry: Registry, embedder: Embedder, config: IndexConfig, state: RunState) -> dict[str, Any]:
    """Check the built version; a failing one is rejected (files removed, rows discarded) and raises."""
    summary = state.summary
    assert summary.version is not None and state.seq is not None
    store = artifact_store(config, registry.home)
    with _stage(state, "validate"):
        live_version = _alias_version(registry, config.alias)
        live = registry.get_version(live_version) if live_version else None
        known = registry.document_states(config.index)
        live_doc_ids = {d for d, s in known.items() if s.status == "active"} - set(state.deleted)
        live_doc_ids |= {d["doc_id"] for d in state.to_write}
        report = validate_version(
            store.local_path(config.index, summary.version),
            registry.member_keys(config.index, state.seq),
            model_id=embedder.model_id,
            live_doc_ids=live_doc_ids,
            thresholds=Thresholds(min_recall=config.min_recall, ef_search=config.hnsw_ef_search,
                                  golden_k=config.golden_k, golden_min_recall=config.golden_min_recall,
                                  golden_max_drop=config.golden_max_drop),
            golden_set=Path(config.golden_set) if config.golden_set else None,
            embed=lambda texts: embedder.embed(texts),
            embed_queries=query_embedding(embedder),
            live_metrics=live.metrics if live and live.model_id == embedder.model_id else None,
            index=state.built_index,
            query_encoder=_stored_encoder(store, summary.version, config.index, embedder.model_id, registry.home),
        )
        state.built_index = None
        summary.metrics = report.metrics
        if not report.ok:
            reason = "; ".join(report.problems)
            store.remove(config.index, summary.version)
            registry.abandon_version(config.index, summary.version, state.seq, reason, report.metrics)
            raise VersionRejected(f"version {summary.version} rejected: {reason}; alias unchanged")
        registry.mark_version_validated(summary.version, report.metrics)
        faults.checkpoint("validated")
    state.step = "validated"
    return report.metrics


def publish_run(registry: Registry, config: IndexConfig, state: RunState) -> dict[str, Any]:
    """Make the validated version live (or the alias's shadow) in one transaction."""
    summary = state.summary
    assert summary.version is not None and state.seq is not None
    with _stage(state, "publish"):
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
        summary.chunks = {"added": state.added_rows, "removed": state.retired_rows,
                          "kept": state.staged_chunks - state.added_rows,
                          "active": registry.count_active_chunks(config.index)}
        record_listing(registry, config, state)
    state.step = "published"
    return summary.alias


def record_listing(registry: Registry, config: IndexConfig, state: RunState) -> None:
    """Remember what an object-store source listed, once the documents it read are the index's.

    After the publish transaction, not in it: a crash between the two leaves the old listing, and
    the next run reads those objects again and finds them unchanged.
    """
    if state.listing is None:
        return
    update = ListingUpdate.from_json(state.listing)
    registry.record_source_objects(config.index, update.source, update.record, update.forget)


def gc_run(registry: Registry, config: IndexConfig, state: RunState) -> dict[str, Any]:
    with _stage(state, "gc"):
        state.summary.gc = collect_garbage(registry, artifact_store(config, registry.home), config.index,
                                           config.retention)
    state.step = "done"
    return state.summary.gc


def _same_build_settings(manifest: dict[str, Any], config: IndexConfig) -> bool:
    """Whether a version can be extended: same manifest format (a format 1 chunk table has no
    contexts to copy), BM25 analyzer and HNSW graph parameters."""
    return (
        manifest.get("format") == MANIFEST_FORMAT
        and manifest.get("bm25", {}).get("analyzer") == ANALYZER_VERSION
        and manifest.get("hnsw", {}).get("M") == config.hnsw_m
        and manifest.get("hnsw", {}).get("ef_construction") == config.hnsw_ef_construction
    )


def _alias_version(registry: Registry, alias: str) -> str | None:
    for row in registry.list_aliases():
        if row.alias == alias:
            return row.version
    return None


def artifact_store(config: IndexConfig, home: Path) -> ArtifactStore:
    """The configured artifact store; by default a directory under the ragpipe home."""
    return ArtifactStore(config.artifacts or str(home / "artifacts"), home / "cache")


def recover_unfinished(registry: Registry, store: ArtifactStore, index: str) -> list[str]:
    """Undo versions a killed run left half-done (call while holding the index lock).

    Files go first: a kill between the two steps leaves a version that is still unfinished, and the
    next run removes it again.
    """
    store.remove_partials(index)
    recovered = []
    for unfinished in registry.unfinished_versions(index):
        version = unfinished.version
        store.remove(index, version)
        registry.abandon_version(index, version, unfinished.version_seq,
                                 "abandoned: the run building it ended before publishing")
        recovered.append(version)
        logger.warning("recovered unfinished version %s of index %s", version, index)
    return recovered


def collect_garbage(registry: Registry, store: ArtifactStore, index: str, retention: int) -> dict[str, Any]:
    """Keep the newest ``retention`` versions (and always the live, shadow and head ones); remove the
    others' files and the registry rows that no retained version contains.

    A version is marked removed before its files are deleted, in a transaction that serializes with
    alias moves, so an alias can never be moved onto files that are going away.
    """
    versions = registry.list_versions(index)  # newest first
    kept = 0
    retained_seqs: list[int] = []
    candidates: list[str] = []
    for v in versions:
        if v.status not in ("published", "retired", "validated"):
            continue
        if v.live or v.canary or v.shadow or v.head or kept < retention:
            kept += 1
            retained_seqs.append(v.version_seq)
        else:
            candidates.append(v.version)
    removed = registry.mark_removed(index, candidates)
    gone = set(removed) | {v.version for v in versions if v.status in ("removed", "rejected")}
    for version in sorted(gone):
        if store.exists(index, version):  # also files a killed gc or rejection left behind
            store.remove(index, version)
    rows = registry.gc_rows(index, min(retained_seqs)) if retained_seqs else 0
    return {"versions_removed": removed, "rows_removed": rows}


def _refuse_wiping(plan: ChangeSet, scan: SourceScan, known: dict[str, Any], config: IndexConfig) -> None:
    if scan.documents or scan.unread or not plan.deleted or config.allow_delete_all:
        return
    raise UnsafeDeletion(
        f"source {scan.source} yielded no documents; refusing to delete all {len(plan.deleted)} documents of "
        f"index {config.index!r} (set allow_delete_all / --allow-delete-all if that is intended); nothing changed"
    )

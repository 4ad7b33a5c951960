"""The in-process runner: one incremental indexing pass, stage by stage, for the CLI and the tests.

discover ─► diff vs registry ─► chunk (new/changed only) ─► embed (cache misses only) ─► apply

Nothing the index serves changes before the final ``apply`` transaction; embeddings are cached
batch by batch before it, so a run killed at any point is finished by the next run without
embedding anything twice.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline import faults
from retrieval.artifacts import ArtifactStore
from pipeline.building import BuildPlan, HnswParams, build_version
from pipeline.chunking import Chunk, chunk_document, chunker_version
from pipeline.config import IndexConfig
from pipeline.diff import ChangeSet, document_chunker, plan_changes
from pipeline.embedding import Embedder, embed_in_batches
from pipeline.errors import UnsafeDeletion, VersionRejected
from pipeline.sources import SourceScan, scan_source
from pipeline.validation import Thresholds, validate_version
from registry import Registry
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
    options: RunOptions = RunOptions(),
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
        VersionRejected: the new version failed validation; it was recorded as rejected, the alias
            did not move.
    """
    stages = _Stages()
    source_label = source.source if isinstance(source, SourceScan) else str(source)
    with registry.index_lock(config.index, config.lock_timeout):
        run_id = registry.start_run(config.index, source_label)
        summary = RunSummary(run_id=run_id, index=config.index, source=source_label, model_id=embedder.model_id)
        try:
            _run(source, registry, embedder, config, summary, stages, progress, options)
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
    options: RunOptions,
) -> None:
    store = artifact_store(config, registry.home)
    with stages.stage("recover"):
        summary.recovered = recover_unfinished(registry, store, config.index)

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
        plan = plan_changes(known, scan.documents, version_of_chunker,
                            unreadable=[s.doc_id for s in scan.skipped if not s.gone])
        _refuse_wiping(plan, scan, known, config)
    summary.documents = {
        "seen": len(scan.documents),
        "new": len(plan.new),
        "changed": len(plan.changed),
        "metadata_only": len(plan.metadata_only),
        "unchanged": len(plan.unchanged),
        "deleted": len(plan.deleted),
        "skipped": len(scan.skipped),
        "kept_on_error": len(plan.kept),
    }
    head = registry.head_version(config.index)
    if plan.is_empty and not options.full and head is not None:
        summary.chunks = {"added": 0, "removed": 0, "kept": 0, "active": registry.count_active_chunks(config.index)}
        summary.embedding = {"chunks_embedded": 0, "chunks_cached": 0, "chars_embedded": 0}
        return

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
    valid_from = {doc.doc_id: doc.valid_from for doc in plan.to_write}

    with stages.stage("stage"):
        parent_ok = (
            head is not None
            and head.model_id == embedder.model_id
            and _same_build_settings(head.manifest or {}, config)
            and store.exists(config.index, head.version)
        )
        full = options.full or not parent_ok
        summary.version = version_name(config.index)
        summary.full_build = full
        seq = registry.create_version(
            index=config.index, version=summary.version, parent=head.version if head else None,
            run_id=summary.run_id, model_id=embedder.model_id, full_build=full,
        )
        added_rows, retired_rows = registry.stage_version(
            index=config.index, version=summary.version, seq=seq, run_id=summary.run_id, chunks=chunks,
            valid_from=valid_from, rechunked_doc_ids=[d.doc_id for d in plan.to_chunk], deleted_doc_ids=plan.deleted,
        )
        faults.checkpoint("staged")
        added_keys, removed_keys = registry.version_changes(config.index, seq)
        touched = {d.doc_id for d in plan.to_write} | set(plan.deleted)
        rows = registry.member_rows(config.index, seq, None if full else sorted(touched))
        by_key = {int(r["chunk_key"]): r for r in rows}
        needed = rows if full else [by_key[k] for k in added_keys]

    with stages.stage("embed"):
        summary.embedding = _embed_missing(needed, registry, embedder, config, progress)

    with stages.stage("build"):
        hashes = list({r["chunk_hash"] for r in needed})
        vectors = registry.fetch_embeddings(embedder.model_id, hashes)
        if vectors:
            dim = len(next(iter(vectors.values())))
        elif not full and head is not None and head.manifest:
            dim = int(head.manifest["model"]["dim"])  # same model as the parent: nothing new to embed
        else:
            dim = embedder.dim
        doc_fields = registry.document_fields(config.index) if full else {}
        for doc_id in plan.deleted:
            doc_fields.pop(doc_id, None)
        doc_fields.update({d.doc_id: (d.source_uri, d.metadata, d.valid_from) for d in plan.to_write})
        build_plan = BuildPlan(
            index=config.index, version=summary.version, parent_version=head.version if head else None,
            parent_dir=None if full else store.local_path(config.index, head.version),  # type: ignore[union-attr]
            run_id=summary.run_id, model_id=embedder.model_id, dim=dim, chunker_version=version_of_chunker,
            rows=rows, added_keys=added_keys, removed_keys=removed_keys, touched_docs=touched,
            doc_fields=doc_fields, vectors=vectors,
            hnsw=HnswParams(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction),
        )
        with store.writing(config.index, summary.version) as out:
            manifest, hnsw_index = build_version(out, build_plan)
        registry.mark_version_built(summary.version, store.version_uri(config.index, summary.version), manifest)

    with stages.stage("validate"):
        live_version = _alias_version(registry, config.alias)
        live = registry.get_version(live_version) if live_version else None
        report = validate_version(
            store.local_path(config.index, summary.version),
            registry.member_keys(config.index, seq),
            model_id=embedder.model_id,
            live_doc_ids={d.doc_id for d in scan.documents} | set(plan.kept),
            thresholds=Thresholds(min_recall=config.min_recall, ef_search=config.hnsw_ef_search,
                                  golden_k=config.golden_k, golden_min_recall=config.golden_min_recall,
                                  golden_max_drop=config.golden_max_drop),
            golden_set=Path(config.golden_set) if config.golden_set else None,
            embed=lambda texts: embedder.embed(texts),
            live_metrics=live["metrics"] if live and live["model_id"] == embedder.model_id else None,
            index=hnsw_index,
        )
        del hnsw_index
        summary.metrics = report.metrics
        if not report.ok:
            reason = "; ".join(report.problems)
            store.remove(config.index, summary.version)
            registry.abandon_version(config.index, summary.version, seq, reason, report.metrics)
            raise VersionRejected(f"version {summary.version} rejected: {reason}; alias unchanged")
        registry.mark_version_validated(summary.version, report.metrics)
        faults.checkpoint("validated")

    with stages.stage("publish"):
        move = registry.publish(
            index=config.index, alias=config.alias, version=summary.version, seq=seq, run_id=summary.run_id,
            documents=plan.to_write, chunk_counts=chunk_counts,
            chunker_versions={d.doc_id: document_chunker(version_of_chunker, d.format) for d in plan.to_write},
            valid_from=valid_from, deleted_doc_ids=plan.deleted, shadow=options.shadow,
            before_commit=lambda: faults.checkpoint("publishing"),
        )
        summary.alias = {"alias": move.alias, "version": move.version, "previous": move.previous,
                         "action": move.action}
        summary.chunks = {"added": added_rows, "removed": retired_rows, "kept": len(chunks) - added_rows,
                          "active": registry.count_active_chunks(config.index)}

    with stages.stage("gc"):
        summary.gc = collect_garbage(registry, store, config.index, config.retention)


def _same_build_settings(manifest: dict[str, Any], config: IndexConfig) -> bool:
    """Whether a version can be extended: same BM25 analyzer and HNSW graph parameters."""
    return (
        manifest.get("bm25", {}).get("analyzer") == ANALYZER_VERSION
        and manifest.get("hnsw", {}).get("M") == config.hnsw_m
        and manifest.get("hnsw", {}).get("ef_construction") == config.hnsw_ef_construction
    )


def _alias_version(registry: Registry, alias: str) -> str | None:
    for row in registry.list_aliases():
        if row["alias"] == alias:
            return str(row["version"])
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
    for version, seq, _uri in registry.unfinished_versions(index):
        store.remove(index, version)
        registry.abandon_version(index, version, seq, "abandoned: the run building it ended before publishing")
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
        if v["status"] not in ("published", "retired", "validated"):
            continue
        if v["live"] or v["shadow"] or v["head"] or kept < retention:
            kept += 1
            retained_seqs.append(int(v["version_seq"]))
        else:
            candidates.append(v["version"])
    removed = registry.mark_removed(index, candidates)
    gone = set(removed) | {v["version"] for v in versions if v["status"] in ("removed", "rejected")}
    for version in sorted(gone):
        if store.exists(index, version):  # also files a killed gc or rejection left behind
            store.remove(index, version)
    rows = registry.gc_rows(index, min(retained_seqs)) if retained_seqs else 0
    return {"versions_removed": removed, "rows_removed": rows}


def _refuse_wiping(plan: ChangeSet, scan: SourceScan, known: dict[str, Any], config: IndexConfig) -> None:
    if scan.documents or not plan.deleted or config.allow_delete_all:
        return
    raise UnsafeDeletion(
        f"source {scan.source} yielded no documents; refusing to delete all {len(plan.deleted)} documents of "
        f"index {config.index!r} (set allow_delete_all / --allow-delete-all if that is intended); nothing changed"
    )


def _embed_missing(
    rows: list[dict[str, Any]], registry: Registry, embedder: Embedder, config: IndexConfig, progress: bool
) -> dict[str, int]:
    """Embed the chunk texts the cache lacks for this model; return the counts."""
    text_by_hash: dict[str, str] = {}
    for row in rows:
        text_by_hash.setdefault(row["chunk_hash"], row["text"])
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


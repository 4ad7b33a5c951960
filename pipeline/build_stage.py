"""The build and validate stages of a run: the staged version's segments and manifest, then the gate.

build: a full build streams every chunk row of the version and its cached vector, page by page, into
new segments; an incremental one writes one segment for the chunks the version adds or rewrites and
deletion sets for what left its parent's segments (see ``pipeline.segments.build``). validate: the
gate of ``pipeline.segments.gate``; a failing version is rejected (its manifest removed, its staging
undone) and the alias does not move.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.embedding import Embedder, model_record, query_embedding
from pipeline.errors import ArtifactWriteError, EmbeddingError, VersionRejected
from pipeline.run_state import RunContext, RunState, stage_timer
from pipeline.segments.build import BATCH_ROWS, SegmentBuild, batched, build_segmented
from pipeline.segments.gate import KeyDelta, validate_segmented
from pipeline.segments.writer import SegmentParams
from pipeline.validation import Thresholds
from registry import ChunkRow, DocumentFields
from retrieval.artifacts import METRIC, ArtifactStore, WriteFailed
from retrieval.onnx import EncoderRef

EMBEDDED = "embedded"  # RunContext.memo: the vectors an incremental run's embed stage made, by chunk hash


def segment_params(ctx: RunContext, dim: int) -> SegmentParams:
    return SegmentParams(model_id=ctx.embedder.model_id, dim=dim, metric=METRIC, hnsw_m=ctx.config.hnsw_m,
                         hnsw_ef_construction=ctx.config.hnsw_ef_construction)


def touched_docs(state: RunState) -> set[str]:
    return {d["doc_id"] for d in state.to_write} | set(state.deleted)


def _rows(ctx: RunContext, state: RunState) -> Iterator[list[ChunkRow]]:
    """The chunk rows the new segments hold, in pages: every member (full), else the members of the
    documents the run wrote (added, and rewritten because their document's fields changed)."""
    assert state.seq is not None
    if state.summary.full_build:
        yield from ctx.registry.iter_member_rows(ctx.index, state.seq, BATCH_ROWS)
    elif state.to_write:
        yield from batched(written_rows(ctx, state), BATCH_ROWS)


def written_rows(ctx: RunContext, state: RunState) -> list[ChunkRow]:
    """The version's rows of the documents the run wrote (read once per process: embed, then build)."""
    assert state.seq is not None
    key = ("written_rows", state.seq)
    if key not in ctx.memo:
        docs = sorted(d["doc_id"] for d in state.to_write)
        ctx.memo[key] = ctx.registry.member_rows(ctx.index, state.seq, docs) if docs else []
    return ctx.memo[key]  # type: ignore[no-any-return]


def _dim(ctx: RunContext, state: RunState, parent_dim: int | None) -> int:
    """The version's dimension: its parent's (same model), else that of a cached vector, else the model's."""
    if parent_dim is not None:
        return parent_dim
    assert state.seq is not None
    for page in ctx.registry.iter_member_rows(ctx.index, state.seq, 1):
        found = ctx.registry.fetch_embeddings(ctx.embedder.model_id, [page[0].chunk_hash])
        if found:
            return len(next(iter(found.values())))
        break
    return ctx.embedder.dim


def build_run(ctx: RunContext, state: RunState) -> str:
    """Write the staged version's new segments, deletion sets and manifest; return the version's URI."""
    summary, registry, config = state.summary, ctx.registry, ctx.config
    assert summary.version is not None and state.seq is not None
    with stage_timer(state, "build"):
        parent = None if summary.full_build or state.parent is None else ctx.segments.read_version(state.parent)
        _added, removed = registry.version_changes(ctx.index, state.seq)
        params = segment_params(ctx, _dim(ctx, state, parent.dim if parent else None))
        doc_fields: dict[str, DocumentFields] = registry.document_fields(ctx.index) if summary.full_build else {}
        for doc_id in state.deleted:
            doc_fields.pop(doc_id, None)
        doc_fields.update({d.doc_id: DocumentFields(d.doc_id, d.source_uri, d.metadata, d.valid_from)
                           for d in state.documents()})
        ctx.store.remove(ctx.index, summary.version)  # what an earlier attempt of this step left
        try:
            encoder = query_encoder(ctx.store, ctx.embedder, registry.home / "cache")
            record = {**model_record(ctx.embedder), **({"encoder": encoder.to_dict()} if encoder else {})}
            build = SegmentBuild(index=ctx.index, version=summary.version, run_id=summary.run_id, params=params,
                                 chunker_version=state.chunker_version, parent=parent, model_record=record,
                                 recall_target=config.min_recall, max_segment_rows=config.segment_rows,
                                 embed_queries=query_embedding(ctx.embedder))
            manifest = build_segmented(
                ctx.segments, build, _rows(ctx, state), doc_fields,
                vector_lookup(ctx), removed=removed,
                expected_rows=registry.member_count(ctx.index, state.seq) if summary.full_build else 0)
            uri = ctx.segments.write_version(manifest)
        except WriteFailed as exc:  # a failed read (of the parent's files, say) stays what it is
            raise ArtifactWriteError(write_failure(exc, summary.version, ctx.store.uri)) from exc
        except LookupError as exc:
            raise EmbeddingError(f"version {summary.version}: {exc} for {ctx.embedder.model_id} "
                                 f"(embed step incomplete)") from exc
        parent_names = set(parent.segment_names) if parent else set()
        state.new_segments = [n for n in manifest.segment_names if n not in parent_names]
        registry.mark_version_built(summary.version, uri, manifest.to_dict())
    state.step = "built"
    return uri


def vector_lookup(ctx: RunContext) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """Vectors by chunk hash: those this process embedded for the run (``ctx.memo[EMBEDDED]``, kept
    by the embed stage of an incremental run), the others read from the embedding cache."""
    kept: dict[str, np.ndarray] = ctx.memo.get(EMBEDDED, {})

    def lookup(hashes: list[str]) -> dict[str, np.ndarray]:
        found = {h: kept[h] for h in hashes if h in kept}
        rest = [h for h in hashes if h not in found]
        if rest:
            found.update(ctx.registry.fetch_embeddings(ctx.embedder.model_id, rest))
        return found

    return lookup


def query_encoder(store: ArtifactStore, embedder: Embedder, cache_dir: Path) -> EncoderRef | None:
    """Store the query encoder of ``embedder``'s model (once per content digest) and return its reference."""
    from pipeline.encoders import encoder_bundle, store_encoder

    bundle = encoder_bundle(embedder, cache_dir)
    return store_encoder(store, bundle) if bundle is not None else None


def stored_encoder(store: ArtifactStore, version: str, index: str, model_id: str,
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


def write_failure(exc: OSError, version: str, root: str) -> str:
    """What an operator reads when a version's files could not be written."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (f"{'disk full' if full else 'write failed'}: cannot write {exc.filename or root} for version {version} "
            f"({exc.strerror or exc}); alias unchanged; {'free space under ' + root if full else 'fix it'} and "
            f"rerun (the embeddings made so far are cached)")


def alias_version(ctx: RunContext, alias: str) -> str | None:
    return next((row.version for row in ctx.registry.list_aliases() if row.alias == alias), None)


def validate_run(ctx: RunContext, state: RunState) -> dict[str, Any]:
    """Check the built version; a failing one is rejected (manifest removed, rows discarded) and raises."""
    summary, registry, config, embedder = state.summary, ctx.registry, ctx.config, ctx.embedder
    assert summary.version is not None and state.seq is not None
    with stage_timer(state, "validate"):
        live_version = alias_version(ctx, config.alias)
        live = registry.get_version(live_version) if live_version else None
        known = registry.document_states(ctx.index)
        live_doc_ids = {d for d, s in known.items() if s.status == "active"} - set(state.deleted)
        live_doc_ids |= {d["doc_id"] for d in state.to_write}
        manifest = ctx.segments.read_version(summary.version)
        assert manifest is not None, "a run builds segmented versions"
        if summary.full_build or manifest.parent is None:
            keys: Any = registry.member_keys(ctx.index, state.seq)
        else:  # the parent passed the full check: what this version changed is checked against it
            added, removed = registry.version_changes(ctx.index, state.seq)
            parent = ctx.segments.read_version(manifest.parent)
            assert parent is not None
            keys = KeyDelta(added, removed, parent.chunks + len(added) - len(removed))
        report = validate_segmented(
            ctx.segments, manifest, state.new_segments, keys,
            model_id=embedder.model_id, live_doc_ids=live_doc_ids,
            thresholds=Thresholds(min_recall=config.min_recall, ef_search=config.hnsw_ef_search,
                                  golden_k=config.golden_k, golden_min_recall=config.golden_min_recall,
                                  golden_max_drop=config.golden_max_drop),
            golden_set=Path(config.golden_set) if config.golden_set else None,
            embed=lambda texts: embedder.embed(texts), embed_queries=query_embedding(embedder),
            live_metrics=live.metrics if live and live.model_id == embedder.model_id else None,
            query_encoder=stored_encoder(ctx.store, summary.version, ctx.index, embedder.model_id, registry.home),
        )
        summary.metrics = report.metrics
        state.version_chunks = manifest.chunks
        if not report.ok:
            reject(ctx, state, "; ".join(report.problems), report.metrics)
        registry.mark_version_validated(summary.version, report.metrics)
        faults.checkpoint("validated")
    state.step = "validated"
    return report.metrics


def reject(ctx: RunContext, state: RunState, reason: str, metrics: dict[str, Any] | None = None) -> None:
    """Record the staged version as rejected, its manifest removed (its new segments go at the next gc)."""
    version = state.summary.version
    assert version is not None and state.seq is not None
    ctx.store.remove(ctx.index, version)
    ctx.registry.abandon_version(ctx.index, version, state.seq, reason, metrics)
    raise VersionRejected(f"version {version} rejected: {reason}; alias unchanged")

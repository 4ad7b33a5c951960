"""The build and validate stages of a run: the staged version's segments and manifest, then the gate.

build: a full build streams every chunk row of the version and its cached vector, page by page, into
new segments; an incremental one writes one segment for the chunks the version adds or rewrites and
deletion sets for what left its parent's segments (see ``pipeline.segments.build``). validate: the
gate of ``pipeline.segments.gate``; a failing version is rejected (its manifest removed, its staging
undone) and the alias does not move.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.embedding import Embedder, model_record, query_embedding
from pipeline.errors import ArtifactWriteError, EmbeddingError, VersionRejected
from pipeline.run_state import RunContext, RunState, stage_timer
from pipeline.segments.build import BATCH_ROWS, SegmentBuild, batched, build_segmented, write_full_part
from pipeline.segments.gate import KeyDelta, validate_segmented
from pipeline.segments.writer import SegmentParams
from pipeline.validation import Thresholds
from registry import ChunkRow, DocumentFields
from retrieval.artifacts import METRIC, ArtifactStore, WriteFailed
from retrieval.onnx import EncoderRef
from retrieval.segments.manifest import SegmentRef

EMBEDDED = "embedded"  # RunContext.memo: the vectors an incremental run's embed stage made, by chunk hash
KNOWN = "known"  # RunContext.memo: the documents' states as the plan read them (publishing changes them, not the build)


def segment_params(ctx: RunContext, dim: int) -> SegmentParams:
    return SegmentParams(model_id=ctx.embedder.model_id, dim=dim, metric=METRIC, hnsw_m=ctx.config.hnsw_m,
                         hnsw_ef_construction=ctx.config.hnsw_ef_construction,
                         exact_below=ctx.config.exact_segment_rows)


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


@dataclass(frozen=True)
class SegmentPart:
    """One segment of a fanned-out full build, written by a task of its own: the version's members
    with ``after < chunk_key <= until`` (``until`` None: no upper bound), ``rows`` of them, segment
    ``number`` of the version. What a task hands the next is this, as JSON: ids and bounds only."""

    run_id: int
    number: int
    after: int
    until: int | None
    rows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SegmentPart":
        return cls(int(data["run_id"]), int(data["number"]), int(data["after"]),
                   None if data.get("until") is None else int(data["until"]), int(data["rows"]))


def split_members(run_id: int, bounds: Sequence[int], total: int, rows: int) -> list[SegmentPart]:
    """The parts of a full build of ``total`` members whose every ``rows``-th key is in ``bounds``
    (pure): one per segment, the last one open-ended; none when the build is one segment."""
    if total <= rows:
        return []
    edges = [0, *bounds]
    parts = [SegmentPart(run_id, i, edges[i], edges[i + 1], rows) for i in range(len(bounds))]
    if total % rows:
        parts.append(SegmentPart(run_id, len(bounds), edges[-1], None, total % rows))
    return parts


def plan_parts(ctx: RunContext, state: RunState) -> list[SegmentPart]:
    """How a full build fans out: one part per segment of at most ``segment_rows`` members; none
    for an incremental build or one that fits a single segment (the build step writes those)."""
    assert state.seq is not None and state.summary.run_id is not None
    if not state.summary.full_build:
        return []
    rows = ctx.config.segment_rows
    total = ctx.registry.member_count(ctx.index, state.seq)
    bounds = ctx.registry.member_key_bounds(ctx.index, state.seq, rows) if total > rows else []
    return split_members(state.summary.run_id, bounds, total, rows)


def build_part(ctx: RunContext, state: RunState, part: SegmentPart) -> list[SegmentRef]:
    """Write one part's segment and, for an object store, upload it at once (the task that writes
    the version manifest may run on another machine); return its reference."""
    assert state.seq is not None and state.summary.version is not None
    with _build_errors(ctx, state.summary.version):
        build = _segment_build(ctx, state, None, segment_params(ctx, _dim(ctx, state, None)), {})
        rows = ctx.registry.iter_member_rows(ctx.index, state.seq, BATCH_ROWS, after=part.after, until=part.until)
        refs = write_full_part(ctx.segments, build, rows, _doc_fields(ctx, state), vector_lookup(ctx),
                               expected_rows=part.rows, first=part.number)
        for ref in refs:
            ctx.segments.upload_segment(ref.name)
    return refs


def build_run(ctx: RunContext, state: RunState, parts: Sequence[SegmentRef] = ()) -> str:
    """Write the staged version's new segments, deletion sets and manifest; return the version's URI.

    Args:
        parts: the segments of a fanned-out full build, in order, written by :func:`build_part`:
            only the manifest is written here. Empty: this step writes every segment.
    """
    summary, registry, config = state.summary, ctx.registry, ctx.config
    assert summary.version is not None and state.seq is not None
    with stage_timer(state, "build"):
        parent = None if summary.full_build or state.parent is None else ctx.segments.read_version(state.parent)
        _added, removed = registry.version_changes(ctx.index, state.seq)
        params = segment_params(ctx, _dim(ctx, state, parent.dim if parent else None))
        ctx.store.remove(ctx.index, summary.version)  # what an earlier attempt of this step left
        with _build_errors(ctx, summary.version):
            encoder = query_encoder(ctx.store, ctx.embedder, registry.home / "cache")
            record = {**model_record(ctx.embedder), **({"encoder": encoder.to_dict()} if encoder else {})}
            build = _segment_build(ctx, state, parent, params, record)
            if parts:
                assert summary.full_build, "only a full build fans out"
                manifest = build.manifest(parts)
            else:
                manifest = build_segmented(
                    ctx.segments, build, _rows(ctx, state), _doc_fields(ctx, state), vector_lookup(ctx),
                    removed=removed, expected_rows=registry.member_count(ctx.index, state.seq) if summary.full_build else 0)
            uri = ctx.segments.write_version(manifest)
        parent_names = set(parent.segment_names) if parent else set()
        state.new_segments = [n for n in manifest.segment_names if n not in parent_names]
        registry.mark_version_built(summary.version, uri, manifest.to_dict())
    state.step = "built"
    return uri


def _doc_fields(ctx: RunContext, state: RunState) -> dict[str, DocumentFields]:
    """The chunk-table fields of the documents the new segments hold: every live document's for a
    full build, else the written documents'."""
    fields: dict[str, DocumentFields] = ctx.registry.document_fields(ctx.index) if state.summary.full_build else {}
    for doc_id in state.deleted:
        fields.pop(doc_id, None)
    fields.update({d.doc_id: DocumentFields(d.doc_id, d.source_uri, d.metadata, d.valid_from)
                   for d in state.documents()})
    return fields


def _segment_build(ctx: RunContext, state: RunState, parent: Any, params: SegmentParams,
                   record: dict[str, Any]) -> SegmentBuild:
    assert state.summary.version is not None
    return SegmentBuild(index=ctx.index, version=state.summary.version, run_id=state.summary.run_id, params=params,
                        chunker_version=state.chunker_version, parent=parent, model_record=record,
                        recall_target=ctx.config.min_recall, max_segment_rows=ctx.config.segment_rows,
                        embed_queries=query_embedding(ctx.embedder))


@contextmanager
def _build_errors(ctx: RunContext, version: str) -> Iterator[None]:
    """Name the version and the cause of a failed write or a missing vector."""
    try:
        yield
    except WriteFailed as exc:  # a failed read (of the parent's files, say) stays what it is
        raise ArtifactWriteError(write_failure(exc, version, ctx.store.uri)) from exc
    except LookupError as exc:
        raise EmbeddingError(f"version {version}: {exc} for {ctx.embedder.model_id} "
                             f"(embed step incomplete)") from exc


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
        known = ctx.memo.get(KNOWN) or registry.document_states(ctx.index)
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
            keys = KeyDelta(added, removed, parent.chunks + len(added) - len(removed), parent)
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

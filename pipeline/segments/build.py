"""Build stage over segments: a version writes only what it adds.

A full build streams the version's chunk rows and their cached vectors, batch by batch, into
segments of at most ``max_segment_rows`` chunks. An incremental build lists its parent's segments,
adds to each the deletion set of the chunks that left it (removed chunks, and the chunks of
documents whose chunk-table fields changed, which are rewritten), and writes one new segment for
the chunks it adds or rewrites. Unchanged segments are referenced, never copied. Every new segment
measures the smallest HNSW search breadth reaching the recall target, recorded in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import faults
from pipeline.segments.storage import SegmentArtifacts
from pipeline.segments.tuning import SERVING_EF_FLOOR
from pipeline.segments.writer import SegmentParams, SegmentWriter
from registry.rows import ChunkRow, DocumentFields
from retrieval.artifacts import CHUNK_SCHEMA, METRIC, PAGE_COLUMNS
from retrieval.bm25 import ANALYZER_VERSION, B, K1
from retrieval.segments.files import SegmentManifest
from retrieval.segments.manifest import SegmentRef, SegmentStore, VersionManifest
from retrieval.segments import files as f
from retrieval.segments.segment import sorted_contains

MAX_SEGMENT_ROWS = 250_000
BATCH_ROWS = 4096

VectorLookup = Callable[[list[str]], dict[str, np.ndarray]]  # chunk hashes -> their cached vectors


@dataclass(frozen=True)
class SegmentBuild:
    """What a segmented build needs besides the chunks: the version's identity, model and parameters.

    Attributes:
        parent: the parent's manifest for an incremental build; None for a full one.
        model_record: the model lock's rest (prefixes, fingerprint, endpoint, stored encoder).
        recall_target: the HNSW recall@10 each new segment's recorded search breadth must reach.
        embed_queries: embeds queries as the model does; the search breadth is then measured with
            queries made of a few words of a sample of the segment's chunks (short queries lie
            between chunks, where a graph needs more breadth than for the chunks' own vectors).
    """

    index: str
    version: str
    run_id: int | None
    params: SegmentParams
    chunker_version: str
    parent: VersionManifest | None = None
    model_record: dict[str, Any] = field(default_factory=dict)
    recall_target: float = 0.95
    max_segment_rows: int = MAX_SEGMENT_ROWS
    embed_queries: Callable[[list[str]], np.ndarray] | None = None

    def manifest(self, segments: Sequence[SegmentRef]) -> VersionManifest:
        p = self.params
        return VersionManifest(
            index=self.index, version=self.version, model_id=p.model_id, dim=p.dim, metric=p.metric,
            analyzer=ANALYZER_VERSION, k1=K1, b=B, hnsw_m=p.hnsw_m, hnsw_ef_construction=p.hnsw_ef_construction,
            segments=tuple(segments), parent=self.parent.version if self.parent else None, run_id=self.run_id,
            created_at=datetime.now(timezone.utc).isoformat(), chunker_version=self.chunker_version,
            model_record=self.model_record, full_build=self.parent is None,
        )


def chunk_table(rows: Sequence[ChunkRow], doc_fields: dict[str, DocumentFields]) -> pa.Table:
    """The chunk-table rows (``CHUNK_SCHEMA``) of registry chunk rows and their documents' fields."""
    return pa.Table.from_pydict(
        {
            "chunk_key": [r.chunk_key for r in rows],
            "chunk_id": [r.chunk_id for r in rows],
            "doc_id": [r.doc_id for r in rows],
            "chunk_hash": [r.chunk_hash for r in rows],
            "ordinal": [r.ordinal for r in rows],
            "heading_path": [list(r.heading_path) for r in rows],
            "char_start": [r.char_start for r in rows],
            "char_end": [r.char_end for r in rows],
            "token_count": [r.token_count for r in rows],
            "text": [r.text for r in rows],
            "source_uri": [doc_fields[r.doc_id].source_uri for r in rows],
            "metadata": [json.dumps(doc_fields[r.doc_id].metadata, sort_keys=True) for r in rows],
            "valid_from": [doc_fields[r.doc_id].valid_from for r in rows],
            "context": [r.context for r in rows],
            **{name: [getattr(r, name) for r in rows] for name in PAGE_COLUMNS},
        },
        schema=CHUNK_SCHEMA,
    )


def segment_ref(manifest: SegmentManifest) -> SegmentRef:
    return SegmentRef(manifest.name, manifest.rows, ef=manifest.ef_search, recall=manifest.recall_at_ef)


QUERY_SAMPLE = 200  # chunks per segment whose first words make the queries the breadth is measured with
QUERY_WORDS = 6


class QuerySample:
    """A uniform sample (reservoir) of a segment's chunk texts, cut to their first words, and the
    queries made of them: half a few words of one chunk, half one word of each of five chunks (a
    query far from every chunk, the harder case for a graph: what a query about something the
    index barely holds looks like)."""

    def __init__(self, size: int = QUERY_SAMPLE, seed: int = 0) -> None:
        self.size, self.seen, self.texts = size, 0, []  # type: ignore[var-annotated]
        self._rng = np.random.default_rng(seed)

    @property
    def queries(self) -> list[str]:
        words = [t.split() for t in self.texts]
        n = len(words)
        return [" ".join(w[:QUERY_WORDS]) if i % 2 == 0 else
                " ".join(words[(i + j) % n][(i + j) % len(words[(i + j) % n])] for j in range(5) if words[(i + j) % n])
                for i, w in enumerate(words)]

    def add(self, texts: Sequence[str]) -> None:
        for text in texts:
            query = " ".join(text.split()[:4 * QUERY_WORDS])
            if len(self.texts) < self.size:
                self.texts.append(query)
            else:
                at = int(self._rng.integers(0, self.seen + 1))
                if at < self.size:
                    self.texts[at] = query
            self.seen += 1


def _finish(writer: SegmentWriter, build: SegmentBuild, sample: QuerySample) -> SegmentRef:
    queries = None
    if build.embed_queries is not None and sample.texts and writer.rows > 10:
        queries = np.asarray(build.embed_queries(sample.queries), dtype=np.float32)
    return segment_ref(writer.finish(recall_target=build.recall_target, recall_queries=queries,
                                     ef_floor=SERVING_EF_FLOOR))


def write_segments(files: SegmentArtifacts, build: SegmentBuild,
                   batches: Iterable[tuple[pa.Table, np.ndarray]], expected_rows: int = 0,
                   first: int = 0) -> list[SegmentRef]:
    """Stream (chunk table, vectors) batches into new segments of at most ``build.max_segment_rows``;
    ``first`` is the first segment's number in the version (it seeds its query sample)."""
    refs: list[SegmentRef] = []
    writer: SegmentWriter | None = None
    sample = QuerySample()
    try:
        for table, vectors in batches:
            at = 0
            while at < table.num_rows:
                if writer is None:
                    expected = min(max(expected_rows - sum(r.rows for r in refs), table.num_rows), build.max_segment_rows)
                    writer = SegmentWriter(files.local, build.params, expected_rows=expected)
                    sample = QuerySample(seed=first + len(refs))
                take = min(table.num_rows - at, build.max_segment_rows - writer.rows)
                part = table.slice(at, take)
                writer.add(part, vectors[at:at + take])
                sample.add(part.column("text").to_pylist())
                at += take
                if writer.rows >= build.max_segment_rows:
                    refs.append(_finish(writer, build, sample))
                    faults.checkpoint("segment_written")
                    writer = None
        if writer is not None and writer.rows:
            refs.append(_finish(writer, build, sample))
            faults.checkpoint("segment_written")
        elif writer is not None:
            writer.abort()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return refs


def delete_from(files: SegmentArtifacts, segments: Sequence[SegmentRef], keys: np.ndarray) -> list[SegmentRef]:
    """``segments`` with ``keys`` added to their deletion sets (each key to the segment holding it).

    Raises:
        ValueError: a key is in none of the segments (the registry and the parent disagree).
    """
    keys = np.unique(np.asarray(keys, dtype=np.int64))
    out, placed = [], np.zeros(len(keys), dtype=bool)
    for ref in segments:
        sorted_keys = np.load(files.segment_path(ref.name) / f.SORTED_KEYS_FILE, mmap_mode="r")
        mine = sorted_contains(sorted_keys, keys)
        if mine.any():
            ref = files.local.with_deletions(ref, keys[mine], np.asarray(sorted_keys))
            placed |= mine
        out.append(ref)
    if not placed.all():
        raise ValueError(f"chunk key {int(keys[~placed][0])} is in no segment of the parent version")
    return out


def vectors_for(rows: Sequence[ChunkRow], lookup: VectorLookup, fallback: Callable[[list[int]], np.ndarray] | None,
                dim: int) -> np.ndarray:
    """The vectors of ``rows``: from the embedding cache, else (``fallback``, by chunk key) the parent's segments.

    Raises:
        LookupError: a chunk's vector is in neither (its embedding step did not finish).
    """
    found = lookup(sorted({r.chunk_hash for r in rows}))
    out = np.empty((len(rows), dim), dtype=np.float32)
    missing = []
    for i, row in enumerate(rows):
        vector = found.get(row.chunk_hash)
        if vector is None:
            missing.append(i)
        else:
            out[i] = vector
    if missing:
        if fallback is None:
            raise LookupError(f"{len(missing)} chunk texts have no cached embedding (e.g. chunk {rows[missing[0]].chunk_id})")
        out[missing] = fallback([rows[i].chunk_key for i in missing])
    return out


def batched(rows: Iterable[ChunkRow], size: int = BATCH_ROWS) -> Iterator[list[ChunkRow]]:
    batch: list[ChunkRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def parent_vectors(files: SegmentArtifacts, segments: Sequence[SegmentRef]) -> Callable[[list[int]], np.ndarray]:
    """Looks chunk keys' stored vectors up in the parent's segments (memory-mapped)."""

    def lookup(keys: list[int]) -> np.ndarray:
        wanted = np.asarray(keys, dtype=np.int64)
        out: np.ndarray | None = None
        found = np.zeros(len(wanted), dtype=bool)
        for ref in segments:
            path = files.segment_path(ref.name)
            sorted_keys = np.load(path / f.SORTED_KEYS_FILE, mmap_mode="r")
            at = np.minimum(np.searchsorted(sorted_keys, wanted), max(len(sorted_keys) - 1, 0))
            hit = (sorted_keys[at] == wanted) & ~found if len(sorted_keys) else found & False
            if hit.any():
                vectors = np.load(path / f.VECTORS_FILE, mmap_mode="r")
                rows = np.load(path / f.KEY_ROWS_FILE, mmap_mode="r")[at[hit]]
                if out is None:
                    out = np.empty((len(wanted), vectors.shape[1]), dtype=np.float32)
                out[hit] = vectors[rows]
                found |= hit
        if out is None or not found.all():
            raise LookupError(f"chunk key {int(wanted[~found][0])} has no cached embedding and no stored vector")
        return out

    return lookup


def vectors_by_hash(files: SegmentArtifacts | SegmentStore, segments: Sequence[SegmentRef],
                    keys: np.ndarray) -> dict[str, np.ndarray]:
    """The stored vectors of the parent's chunks ``keys``, by chunk hash: a re-chunked document's
    unchanged texts get new keys but keep their hashes, so their vectors are read from the segment
    files beside the build rather than from the embedding cache (random reads of a table of every
    vector the model made, seconds a thousand at a million chunks)."""
    out: dict[str, np.ndarray] = {}
    keys = np.unique(np.asarray(keys, dtype=np.int64))
    for ref in segments:
        path = files.segment_path(ref.name)
        sorted_keys = np.load(path / f.SORTED_KEYS_FILE, mmap_mode="r")
        inside = sorted_contains(sorted_keys, keys)
        if not inside.any():
            continue
        rows = np.asarray(np.load(path / f.KEY_ROWS_FILE, mmap_mode="r")[np.searchsorted(sorted_keys, keys[inside])])
        with pa.memory_map(str(path / f.CHUNKS_FILE), "r") as source:
            hashes = pa.ipc.open_file(source).read_all().column("chunk_hash").take(pa.array(rows)).to_pylist()
        vectors = np.load(path / f.VECTORS_FILE, mmap_mode="r")
        order = np.argsort(rows)  # ascending rows: one pass over the mapped file
        stored = np.asarray(vectors[rows[order]], dtype=np.float32)
        for i, vector in zip(order.tolist(), stored):
            out.setdefault(hashes[i], vector)
    return out


def with_parent_vectors(lookup: VectorLookup, parent_vectors: Callable[[], dict[str, np.ndarray]]) -> VectorLookup:
    """``lookup``, asked only for the hashes ``parent_vectors`` (read on first use) lacks."""
    known: list[dict[str, np.ndarray]] = []

    def both(hashes: list[str]) -> dict[str, np.ndarray]:
        if not known:
            known.append(parent_vectors())
        found = {h: known[0][h] for h in hashes if h in known[0]}
        rest = [h for h in hashes if h not in found]
        if rest:
            found.update(lookup(rest))
        return found

    return both


def write_full_part(files: SegmentArtifacts, build: SegmentBuild, rows: Iterable[list[ChunkRow]],
                    doc_fields: dict[str, DocumentFields], lookup: VectorLookup, *, expected_rows: int = 0,
                    first: int = 0) -> list[SegmentRef]:
    """Write the segments of one part of a full build (a run of its members in key order), as
    :func:`build_segmented` writes a full build's; the version manifest is written apart."""
    batches = ((chunk_table(batch, doc_fields), vectors_for(batch, lookup, None, build.params.dim)) for batch in rows)
    return write_segments(files, build, batches, expected_rows, first)


def build_segmented(files: SegmentArtifacts, build: SegmentBuild, rows: Iterable[list[ChunkRow]],
                    doc_fields: dict[str, DocumentFields], lookup: VectorLookup, *, removed: Sequence[int] = (),
                    expected_rows: int = 0) -> VersionManifest:
    """Write the version's new segments and deletion sets and return its manifest (not yet written).

    Args:
        rows: batches of the chunk rows the new segments hold: every member for a full build; the
            added and rewritten chunks for an incremental one.
        removed: for an incremental build, the keys that leave the parent's segments besides the
            rewritten ones (removed chunks).
    """
    parent = build.parent
    fallback = parent_vectors(files, parent.segments) if parent is not None else None
    if parent is not None and len(removed):
        lookup = with_parent_vectors(lookup, lambda: vectors_by_hash(files, parent.segments, np.asarray(removed)))
    rewritten: list[int] = []

    def batches() -> Iterator[tuple[pa.Table, np.ndarray]]:
        for batch in rows:
            rewritten.extend(r.chunk_key for r in batch)
            yield chunk_table(batch, doc_fields), vectors_for(batch, lookup, fallback, build.params.dim)

    kept: list[SegmentRef] = []
    if parent is not None:
        new = write_segments(files, build, batches(), expected_rows)
        # rewritten chunks that the parent held leave its segments; added ones were never there
        parent_keys = np.asarray(rewritten, dtype=np.int64)
        leaving = np.union1d(np.asarray(removed, dtype=np.int64), _held_by(files, parent.segments, parent_keys))
        kept = [ref for ref in delete_from(files, parent.segments, leaving) if ref.live > 0]
    else:
        new = write_segments(files, build, batches(), expected_rows)
    faults.checkpoint("hnsw_written")
    return build.manifest([*kept, *new])


def _held_by(files: SegmentArtifacts, segments: Sequence[SegmentRef], keys: np.ndarray) -> np.ndarray:
    """Those of ``keys`` that some segment holds and has not deleted."""
    held = np.zeros(len(keys), dtype=bool)
    for ref in segments:
        sorted_keys = np.load(files.segment_path(ref.name) / f.SORTED_KEYS_FILE, mmap_mode="r")
        inside = sorted_contains(sorted_keys, keys)
        if inside.any():
            inside &= ~sorted_contains(files.local.read_deletions(ref), keys)
        held |= inside
    return keys[held]


def same_build_settings(manifest: dict[str, Any] | None, params: SegmentParams) -> bool:
    """Whether a version (its registry manifest) can be extended with segments of ``params``: a
    segmented version of the same analyzer, metric and HNSW graph parameters. A whole-copy version
    (format 1 or 2) cannot: the next run rebuilds it into segments from the registry and the
    embedding cache, embedding nothing again."""
    data = manifest or {}
    return (data.get("format") == 3 and data.get("analyzer") == ANALYZER_VERSION and data.get("metric") == METRIC
            and data.get("hnsw_m") == params.hnsw_m and data.get("hnsw_ef_construction") == params.hnsw_ef_construction)

"""Compaction: merge segments into one, dropping the chunks a version deleted from them, without re-embedding.

A merge reads its inputs' stored vectors, chunk tables and BM25 postings (mapped to the merged
vocabulary by term, never re-analyzed) in batches of live rows and streams them into a
:class:`~pipeline.segments.writer.SegmentWriter`; the merged segment's graph is built from the
stored vectors. The inputs stay untouched — older versions still list them — and a new version lists
the merged segment in their place (:func:`replace_merged`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.segments.writer import SegmentParams, SegmentWriter
from retrieval.bm25 import Analyzer
from retrieval.segments.files import SegmentManifest
from retrieval.segments.manifest import SegmentRef, VersionManifest
from pipeline.segments.tuning import SERVING_EF_FLOOR
from retrieval.segments.search import SegmentPool
from retrieval.segments.segment import Segment, concat_ranges

MERGE_BATCH_ROWS = 8192


def merge_segments(pool: SegmentPool, refs: Sequence[SegmentRef], params: SegmentParams, *,
                   recall_target: float | None = None, batch_rows: int = MERGE_BATCH_ROWS,
                   analyzer: Analyzer | None = None) -> SegmentManifest:
    """Write one new segment with the live chunks of the segments ``refs`` name (each minus the
    deletions its ref lists), in the order of ``refs`` and of their rows.

    Returns:
        The merged segment's manifest (``merged_from`` names the inputs).

    Raises:
        WriteFailed: a file could not be written; the inputs are unchanged and the partial output
            is removed.
    """
    store = pool.store
    expected = sum(ref.live for ref in refs)
    with SegmentWriter(store, params, analyzer=analyzer, expected_rows=expected,
                       merged_from=[ref.name for ref in refs]) as writer:
        for ref in refs:
            segment = pool.get(ref.name)
            live_rows = _live_rows(segment, store.read_deletions(ref))
            if len(live_rows):
                _copy_rows(segment, live_rows, writer, batch_rows)
        # the least breadth a build records (see tuning.SERVING_EF_FLOOR): the inputs may have had none
        return writer.finish(recall_target=recall_target, ef_floor=SERVING_EF_FLOOR)


def _live_rows(segment: Segment, deleted: np.ndarray) -> np.ndarray:
    live = np.ones(segment.rows, dtype=bool)
    if len(deleted):
        rows = segment.rows_of(deleted)
        live[rows[rows >= 0]] = False
    return np.flatnonzero(live)


def _copy_rows(segment: Segment, live_rows: np.ndarray, writer: SegmentWriter, batch_rows: int) -> None:
    """Stream ``live_rows`` of ``segment`` into ``writer`` with their postings, batch by batch."""
    term_map = writer.term_ids(segment.terms())  # the segment's term index -> the writer's term id
    offsets = np.asarray(segment.offsets)
    term_of = np.repeat(np.arange(len(term_map), dtype=np.int32), np.diff(offsets))
    by_row = np.argsort(segment.posting_rows, kind="stable")  # postings in row order
    row_start = np.searchsorted(np.asarray(segment.posting_rows)[by_row], np.arange(segment.rows + 1))
    for at in range(0, len(live_rows), batch_rows):
        rows = live_rows[at:at + batch_rows]
        counts = row_start[rows + 1] - row_start[rows]
        postings = by_row[concat_ranges(row_start[rows], counts)]
        writer.add_analyzed(
            segment.chunks.take(rows), np.asarray(segment.vectors[rows], dtype=np.float32),
            term_map[term_of[postings]], np.repeat(np.arange(len(rows), dtype=np.int32), counts),
            np.asarray(segment.posting_tfs[postings]), np.asarray(segment.doc_lengths[rows]),
        )


def replace_merged(current: VersionManifest, base: Sequence[SegmentRef], merged: SegmentManifest,
                   pool: SegmentPool) -> tuple[SegmentRef, ...]:
    """The segments of a version after ``current``: ``current``'s, with the merged inputs replaced by
    the merged segment at the first input's place.

    ``base`` are the inputs' refs as the merge read them. Keys ``current`` deleted from an input
    since then (a version published while the merge ran) are deleted from the merged segment, so
    the chunk set stays ``current``'s.

    Raises:
        ValueError: an input is no longer among ``current``'s segments (the merge is stale).
    """
    names = [ref.name for ref in base]
    now = {ref.name: ref for ref in current.segments}
    gone = [n for n in names if n not in now]
    if gone:
        raise ValueError(f"segment {gone[0]} left version {current.version} while it was merged; merge again")
    store = pool.store
    later = [np.setdiff1d(store.read_deletions(now[ref.name]), store.read_deletions(ref)) for ref in base]
    extra = np.concatenate(later) if later else np.zeros(0, dtype=np.int64)
    out = SegmentRef(merged.name, merged.rows)
    if len(extra):
        out = store.with_deletions(out, extra, pool.get(merged.name).sorted_keys)
    kept: list[SegmentRef] = []
    for ref in current.segments:
        if ref.name == names[0]:
            kept.append(out)
        elif ref.name not in names:
            kept.append(ref)
    return tuple(kept)


def segment_params(manifest: VersionManifest, exact_below: int = 0) -> SegmentParams:
    """The parameters new segments of ``manifest``'s index are written with (``exact_below``: see
    :class:`SegmentParams`)."""
    return SegmentParams(model_id=manifest.model_id, dim=manifest.dim, metric=manifest.metric,
                         hnsw_m=manifest.hnsw_m, hnsw_ef_construction=manifest.hnsw_ef_construction,
                         exact_below=exact_below)

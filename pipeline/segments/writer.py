"""Build stage, segment form: write one immutable segment from chunks streamed in bounded batches.

Each batch (a chunk table batch and its vectors) goes straight to disk: the chunk table to an Arrow
IPC file, keys, vectors and BM25 lengths appended to ``.npy`` files whose headers are completed at
the end, postings spilled as (term, row, frequency) arrays. What stays in Python is the vocabulary
(one entry per distinct term). :meth:`SegmentWriter.finish` sorts the postings by term hash, builds
the HNSW graph from the written vectors and saves it, measures the search breadth (:mod:`pipeline.segments.tuning`),
records every file's size and SHA-256 in ``segment.json``, fsyncs and renames the directory to its
name; until then the segment is a hidden temporary directory no reader lists.

A segment of fewer than ``SegmentParams.exact_below`` chunks gets no graph: it is searched exactly
(a matrix product over its vectors, recall 1), as search engines leave their small segments
unindexed, since building a graph costs far more than the queries it would save there. Runs'
small additions and upserts are published without waiting for a graph; merges give the merged
segment its graph once it reaches the threshold.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from retrieval.artifacts import CHUNK_SCHEMA, METRIC, check_hnsw_written, indexed_text, sha256_file, writing_file
from retrieval.bm25 import Analyzer
from retrieval.segments import files as f
from retrieval.segments.files import FileInfo, SegmentManifest, term_hashes
from retrieval.segments.manifest import SegmentStore, fsync_path

_HEADER_BYTES = 128  # a fixed .npy header, rewritten with the final shape when the file is complete
_SPILL = (".posting_terms.npy", ".posting_rows.npy", ".posting_tfs.npy")
GRAPH_BATCH = 65536  # vectors given to the graph at a time


class SegmentInputError(PipelineError, ValueError):
    """A batch given to a segment writer is malformed; the message names the chunk and the field."""


@dataclass(frozen=True)
class SegmentParams:
    """What every segment of an index shares: the model, the metric and the HNSW parameters."""

    model_id: str
    dim: int
    metric: str = METRIC
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    exact_below: int = 0  # a segment of fewer chunks is searched exactly, without a graph (0: every one has a graph)


class NpyAppender:
    """A ``.npy`` file written by appending rows; its header gets the row count on :meth:`close`."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self._fh = open(path, "wb")
        self._fh.write(b"\0" * _HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        with writing_file(self.path):
            self._fh.write(array.tobytes())
        self.rows += len(array)

    def close(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        text = repr(header).encode("latin1")
        text += b" " * (_HEADER_BYTES - 10 - len(text) - 1) + b"\n"
        with writing_file(self.path):
            self._fh.seek(0)
            self._fh.write(b"\x93NUMPY\x01\x00" + (len(text)).to_bytes(2, "little") + text)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


class SegmentWriter:
    """Writes one segment into ``store``; use as a context manager (an error discards the segment)."""

    def __init__(self, store: SegmentStore, params: SegmentParams, *, analyzer: Analyzer | None = None,
                 expected_rows: int = 0, merged_from: Sequence[str] = ()) -> None:
        self.store, self.params = store, params
        self.analyzer = analyzer or Analyzer()
        self.merged_from = tuple(merged_from)
        self.name = f"seg-{uuid.uuid4().hex}"
        store.segments_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = store.segments_dir / f".{self.name}.tmp"
        self.tmp.mkdir()
        self.rows = 0
        self._keys = NpyAppender(self.tmp / f.KEYS_FILE, np.int64)
        self._vectors = NpyAppender(self.tmp / f.VECTORS_FILE, np.float32, (params.dim,))
        self._lengths = NpyAppender(self.tmp / f.DOC_LENGTHS_FILE, np.int32)
        self._postings = [NpyAppender(self.tmp / name, np.int32) for name in _SPILL]
        self._sink = pa.OSFile(str(self.tmp / f.CHUNKS_FILE), "wb")
        self._chunks = pa.ipc.new_file(self._sink, CHUNK_SCHEMA)
        self._vocab: dict[str, int] = {}
        self._df = np.zeros(1024, dtype=np.int64)

    def __enter__(self) -> "SegmentWriter":
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        """Discard the unfinished segment."""
        for close in [*(a._fh.close for a in [self._keys, self._vectors, self._lengths, *self._postings]),
                      self._sink.close]:
            try:
                close()  # flushing what is buffered fails again on a full disk: the first error is the one raised
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def term_ids(self, terms: Sequence[str]) -> np.ndarray:
        """The writer's ids of ``terms``, new terms added to its vocabulary."""
        vocab = self._vocab
        return np.fromiter((vocab.setdefault(t, len(vocab)) for t in terms), dtype=np.int32, count=len(terms))

    def add(self, chunks: pa.Table | pa.RecordBatch, vectors: np.ndarray) -> None:
        """Append chunks (rows of ``CHUNK_SCHEMA``) and their vectors, analyzing their indexed text
        (context and text, as :func:`retrieval.artifacts.indexed_text`) for BM25.

        Raises:
            SegmentInputError: the batch is malformed (naming the chunk key and the field).
        """
        table = _as_table(chunks)
        texts = table.column("text").to_pylist()
        contexts = table.column("context").to_pylist()
        keys = table.column("chunk_key").to_pylist()
        local: dict[str, int] = {}
        terms, rows, tfs, lengths = [], [], [], []
        for row, (key, context, text) in enumerate(zip(keys, contexts, texts)):
            if text is None:
                raise SegmentInputError(f"chunk {key}: field 'text' is null")
            counts = Counter(self.analyzer.terms(indexed_text(context, text)))
            for term, tf in counts.items():
                terms.append(local.setdefault(term, len(local)))
                rows.append(row)
                tfs.append(tf)
            lengths.append(sum(counts.values()))
        ids = self.term_ids(list(local))
        self.add_analyzed(table, vectors, ids[np.asarray(terms, dtype=np.int64)] if terms else np.zeros(0, np.int32),
                          np.asarray(rows, dtype=np.int32), np.asarray(tfs, dtype=np.int32),
                          np.asarray(lengths, dtype=np.int32))

    def add_analyzed(self, chunks: pa.Table | pa.RecordBatch, vectors: np.ndarray, term_ids: np.ndarray,
                     rows: np.ndarray, tfs: np.ndarray, lengths: np.ndarray) -> None:
        """Append chunks whose BM25 postings are already known (a merge reuses its inputs' postings).

        Args:
            term_ids: per posting, the term's id from :meth:`term_ids`; each (term, row) once.
            rows: per posting, the chunk's row within this batch; ascending within each term.
            tfs: per posting, the term's frequency in the chunk.
            lengths: per chunk, its BM25 length (analyzed terms).
        """
        table = _as_table(chunks)
        n = table.num_rows
        keys = table.column("chunk_key").to_numpy(zero_copy_only=False)
        vectors = np.asarray(vectors)
        self._check(table, keys, vectors, lengths)
        if n == 0:
            return
        self._chunks.write_table(table)
        self._keys.append(keys)
        self._vectors.append(vectors)
        self._lengths.append(lengths)
        for appender, values in zip(self._postings, (term_ids, rows.astype(np.int64) + self.rows, tfs)):
            appender.append(values)
        if len(self._vocab) > len(self._df):
            self._df = np.concatenate([self._df, np.zeros(max(len(self._vocab), 2 * len(self._df)) - len(self._df),
                                                          dtype=np.int64)])
        self._df[: len(self._vocab)] += np.bincount(term_ids, minlength=len(self._vocab))[: len(self._vocab)]
        self.rows += n

    def _check(self, table: pa.Table, keys: np.ndarray, vectors: np.ndarray, lengths: np.ndarray) -> None:
        n = table.num_rows
        if table.column("chunk_key").null_count:
            raise SegmentInputError("a chunk has a null 'chunk_key'")
        if vectors.ndim != 2 or vectors.shape != (n, self.params.dim):
            raise SegmentInputError(f"vectors of chunks {keys[:3].tolist()}...: shape {vectors.shape}, expected "
                                    f"({n}, {self.params.dim})")
        bad = ~np.isfinite(vectors).all(axis=1) if n else np.zeros(0, dtype=bool)
        if bad.any():
            raise SegmentInputError(f"chunk {int(keys[bad][0])}: its vector holds NaN or infinity")
        if len(lengths) != n:
            raise SegmentInputError(f"{len(lengths)} BM25 lengths for {n} chunks")
        if len(np.unique(keys)) != n:
            dup = np.unique(keys)[np.bincount(np.searchsorted(np.unique(keys), keys)) > 1][0]
            raise SegmentInputError(f"chunk key {int(dup)} appears twice in one batch")

    def finish(self, *, recall_target: float | None = None, recall_queries: np.ndarray | None = None,
               ef_floor: int = 0) -> SegmentManifest:
        """Complete the segment and give it its name; return its manifest.

        Args:
            recall_target: measure the smallest search breadth reaching this HNSW recall@10 on a
                sample of the segment's vectors, and record it (None: not measured).
            recall_queries: query vectors to measure the recall with instead (see
                :func:`pipeline.segments.tuning.choose_ef`).
            ef_floor: the least breadth to record (candidates below it are not tried).

        Raises:
            SegmentInputError: a chunk key was written twice.
            WriteFailed: a file could not be written (ENOSPC for a full disk), naming it.
        """
        for appender in [self._keys, self._vectors, self._lengths, *self._postings]:
            appender.close()
        self._chunks.close()
        self._sink.close()
        keys = np.load(self.tmp / f.KEYS_FILE, mmap_mode="r")
        order = np.argsort(keys, kind="stable")
        sorted_keys = np.asarray(keys[order])
        twice = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(twice):
            raise SegmentInputError(f"chunk key {int(sorted_keys[twice[0]])} was written twice into one segment")
        _save(self.tmp / f.SORTED_KEYS_FILE, sorted_keys)
        _save(self.tmp / f.KEY_ROWS_FILE, order.astype(np.int64))
        total_length = int(np.load(self.tmp / f.DOC_LENGTHS_FILE, mmap_mode="r").sum(dtype=np.int64))
        postings, terms = self._write_postings()
        vectors = np.load(self.tmp / f.VECTORS_FILE, mmap_mode="r")
        ef = recall = None
        graph = self._graph(vectors, keys) if self.rows >= self.params.exact_below else None
        if graph is None:
            recall = 1.0 if recall_target is not None and self.rows else None  # searched exactly
        elif recall_target is not None and self.rows:
            from pipeline.segments.tuning import EF_CANDIDATES, choose_ef

            candidates = [c for c in EF_CANDIDATES if c >= ef_floor] or [max(EF_CANDIDATES)]
            choice = choose_ef(graph, vectors, keys, recall_target, queries=recall_queries, candidates=candidates)
            ef, recall = choice.ef, choice.recall
        graph_less = graph is None
        del graph, vectors
        names = [n for n in f.DATA_FILES if n != f.GRAPH_FILE or not graph_less]
        files = {name: FileInfo((self.tmp / name).stat().st_size, sha256_file(self.tmp / name)) for name in names}
        p = self.params
        manifest = SegmentManifest(
            name=self.name, created_at=datetime.now(timezone.utc).isoformat(), model_id=p.model_id, dim=p.dim,
            metric=p.metric, analyzer=self.analyzer.version, rows=self.rows, postings=postings, terms=terms,
            total_length=total_length, min_key=int(sorted_keys[0]) if self.rows else 0,
            max_key=int(sorted_keys[-1]) if self.rows else 0, hnsw_m=p.hnsw_m,
            hnsw_ef_construction=p.hnsw_ef_construction, files=files, ef_search=ef,
            recall_at_ef=None if recall is None else round(recall, 4), recall_target=recall_target,
            merged_from=self.merged_from, exact=graph_less,
        )
        with writing_file(self.tmp / f.SEGMENT_MANIFEST) as path:
            path.write_text(manifest.to_json(), encoding="utf-8")
        for name in [*names, f.SEGMENT_MANIFEST]:
            fsync_path(self.tmp / name)
        fsync_path(self.tmp)
        final = self.store.segment_path(self.name)
        with writing_file(final):
            self.tmp.rename(final)
        fsync_path(self.store.segments_dir)
        return manifest

    def _graph(self, vectors: np.ndarray, keys: np.ndarray) -> Any:
        """The HNSW graph of the written vectors, labelled by chunk key, saved into the segment."""
        import hnswlib

        graph = hnswlib.Index(space=self.params.metric, dim=self.params.dim)
        graph.init_index(max_elements=max(self.rows, 1), M=self.params.hnsw_m,
                         ef_construction=self.params.hnsw_ef_construction)
        for at in range(0, self.rows, GRAPH_BATCH):
            graph.add_items(np.asarray(vectors[at:at + GRAPH_BATCH], dtype=np.float32), np.asarray(keys[at:at + GRAPH_BATCH]))
        with writing_file(self.tmp / f.GRAPH_FILE) as path:
            graph.save_index(str(path))
        check_hnsw_written(self.tmp / f.GRAPH_FILE)
        return graph

    def _write_postings(self) -> tuple[int, int]:
        """Sort the spilled postings by term hash and write the term-major arrays; (postings, terms)."""
        terms = list(self._vocab)
        hashes = term_hashes(terms)
        by_hash = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[by_hash]
        same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
        if len(same):  # 64-bit hashes of distinct terms: about one chance in 10^8 for a million terms
            a, b = terms[by_hash[same[0]]], terms[by_hash[same[0] + 1]]
            raise SegmentInputError(f"terms {a!r} and {b!r} share a 64-bit hash; the segment cannot key them apart")
        rank = np.empty(len(terms), dtype=np.int64)
        rank[by_hash] = np.arange(len(terms))
        spilled = [np.load(self.tmp / name, mmap_mode="r") for name in _SPILL]
        term_of = rank[spilled[0]] if len(terms) else np.zeros(0, dtype=np.int64)
        order = np.argsort(term_of, kind="stable")  # rows stay ascending within a term
        offsets = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum(np.bincount(term_of, minlength=len(terms)), out=offsets[1:])
        _save(self.tmp / f.TERM_HASHES_FILE, sorted_hashes)
        _save(self.tmp / f.DF_FILE, self._df[: len(terms)][by_hash].astype(np.int32))
        _save(self.tmp / f.OFFSETS_FILE, offsets)
        _save(self.tmp / f.POSTING_ROWS_FILE, np.asarray(spilled[1])[order])
        _save(self.tmp / f.POSTING_TFS_FILE, np.asarray(spilled[2])[order])
        with writing_file(self.tmp / f.TERMS_FILE) as path:
            table = pa.table({"term": pa.array([terms[i] for i in by_hash.tolist()], pa.string())})
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
                out.write_table(table)
        del spilled, term_of
        for name in _SPILL:
            (self.tmp / name).unlink()
        return len(order), len(terms)


def _as_table(chunks: pa.Table | pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([chunks]) if isinstance(chunks, pa.RecordBatch) else chunks
    missing = [n for n in CHUNK_SCHEMA.names if n not in table.column_names]
    if missing:
        raise SegmentInputError(f"chunk batch lacks the fields {', '.join(missing)}")
    try:
        return table.select(CHUNK_SCHEMA.names).cast(CHUNK_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise SegmentInputError(f"chunk batch does not fit the chunk table's schema: {exc}") from exc


def _save(path: Path, array: np.ndarray) -> None:
    with writing_file(path):
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)

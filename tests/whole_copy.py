"""Whole-copy versions (manifest formats 1 and 2), as ragpipe wrote them before segments: for tests that old versions stay readable.

An incremental build starts from its parent's files: the HNSW graph is loaded and changed in place
(removed chunks tombstoned, new ones added into freed slots), the BM25 tables and the chunk table are
copied minus what left plus what entered. A full build makes everything from the registry alone.
Either way the HNSW labels are the registry's chunk keys.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults
from registry.rows import ChunkRow, DocumentFields
from retrieval.artifacts import (
    CHUNK_SCHEMA,
    PAGE_COLUMNS,
    CHUNKS_FILE,
    MANIFEST,
    MANIFEST_FORMAT,
    MATRIX_FILE,
    METRIC,
    VECTORS_FILE,
    indexed_text,
    allocate_matrix,
    check_hnsw_written,
    sha256_file,
    writing_file,
)
from retrieval.bm25 import B, K1, Analyzer, BM25Tables
from retrieval.onnx import EncoderRef

@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 200


@dataclass
class BuildPlan:
    """Everything a build needs, gathered from the registry and the run.

    Attributes:
        rows: chunk rows to (re)write into the chunk table: all members for a full build, the members
            of ``touched_docs`` for an incremental one.
        added_keys / removed_keys: the HNSW and BM25 changes relative to the parent (incremental).
        touched_docs: documents whose rows in the parent's chunk table are replaced by ``rows``.
        doc_fields: doc_id -> its source_uri, metadata and valid_from, for every document in ``rows``.
        vectors: chunk_hash -> vector for every added key (all members for a full build).
        encoder: the stored query encoder (ONNX bundle) that encodes queries as the documents were
            encoded; None when the embedder has none (queries then need an encoder from the caller).
        model_record: the rest of the model lock the manifest records under ``model`` (the
            prefixes, the fingerprint of the model's files, an HTTP endpoint).
    """

    index: str
    version: str
    parent_version: str | None
    parent_dir: Path | None
    run_id: int
    model_id: str
    dim: int
    chunker_version: str
    rows: list[ChunkRow]
    added_keys: list[int] = field(default_factory=list)
    removed_keys: list[int] = field(default_factory=list)
    touched_docs: set[str] = field(default_factory=set)
    doc_fields: dict[str, DocumentFields] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    hnsw: HnswParams = field(default_factory=HnswParams)
    encoder: EncoderRef | None = None
    model_record: dict[str, Any] = field(default_factory=dict)  # prefixes, fingerprint, endpoint

    @property
    def full(self) -> bool:
        return self.parent_dir is None


def build_version(out: Path, plan: BuildPlan, analyzer: Analyzer | None = None) -> tuple[dict[str, Any], Any]:
    """Write the version's files into ``out``; return its manifest (also written) and the HNSW index.

    Raises:
        WriteFailed: a file could not be written (ENOSPC for a full disk), naming the file.
    """
    analyzer = analyzer or Analyzer()
    chunks, parent_mask, parent_keys = _chunk_table(plan)
    with writing_file(out / CHUNKS_FILE) as path:
        pq.write_table(chunks, path, compression="snappy")

    by_key = {r.chunk_key: r for r in plan.rows}
    _write_matrix(out / MATRIX_FILE, plan, chunks, parent_mask, parent_keys, by_key)

    def indexed(keys: Sequence[int]) -> list[tuple[int, str]]:
        return [(k, indexed_text(by_key[k].context, by_key[k].text)) for k in keys]

    if plan.full:
        keys = [int(k) for k in chunks.column("chunk_key").to_pylist()]
        bm25 = BM25Tables.empty().update([], indexed(keys), analyzer)
    else:
        assert plan.parent_dir is not None
        keys = plan.added_keys
        bm25 = BM25Tables.read(plan.parent_dir).update(plan.removed_keys, indexed(plan.added_keys), analyzer)
    bm25_files = bm25.write(out)

    hnsw_info, index = _write_hnsw(out / VECTORS_FILE, plan, keys, by_key, chunks.num_rows)
    faults.checkpoint("hnsw_written")

    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
             for name in [CHUNKS_FILE, MATRIX_FILE, VECTORS_FILE, *bm25_files]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "index": plan.index,
        "version": plan.version,
        "parent_version": plan.parent_version,
        "run_id": plan.run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "full_build": plan.full,
        "model": {"id": plan.model_id, "dim": plan.dim,
                  **({"encoder": plan.encoder.to_dict()} if plan.encoder is not None else {}), **plan.model_record},
        "metric": METRIC,
        "hnsw": {"M": plan.hnsw.m, "ef_construction": plan.hnsw.ef_construction, **hnsw_info},
        "bm25": {"analyzer": analyzer.version, "k1": K1, "b": B, "avgdl": bm25.avgdl,
                 "vocabulary": len(bm25.terms)},
        "chunker_version": plan.chunker_version,
        "hash_algorithm": "sha256",
        "counts": {"chunks": chunks.num_rows, "documents": len(set(chunks.column("doc_id").to_pylist()))},
        "files": files,
    }
    with writing_file(out / MANIFEST) as path:
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest, index


def _chunk_table(plan: BuildPlan) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
    """The version's chunk table; for an incremental build also which parent rows it kept and the
    parent's chunk keys in row order."""
    rows = plan.rows
    fresh = pa.Table.from_pydict(
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
            "source_uri": [plan.doc_fields[r.doc_id].source_uri for r in rows],
            "metadata": [json.dumps(plan.doc_fields[r.doc_id].metadata, sort_keys=True) for r in rows],
            "valid_from": [plan.doc_fields[r.doc_id].valid_from for r in rows],
            "context": [r.context for r in rows],
            **{name: [getattr(r, name) for r in rows] for name in PAGE_COLUMNS},
        },
        schema=CHUNK_SCHEMA,
    )
    if plan.full:
        return fresh, None, None
    assert plan.parent_dir is not None
    parent = pq.read_table(plan.parent_dir / CHUNKS_FILE, schema=CHUNK_SCHEMA)
    parent_keys = parent.column("chunk_key").to_numpy()
    keep = np.ones(parent.num_rows, dtype=bool)
    if plan.touched_docs:
        touched = pc.is_in(parent.column("doc_id"), value_set=pa.array(sorted(plan.touched_docs), pa.string()))
        keep = ~touched.to_numpy(zero_copy_only=False)
        parent = parent.filter(pa.array(keep))
    return pa.concat_tables([parent, fresh]).combine_chunks(), keep, parent_keys


def _write_matrix(path: Path, plan: BuildPlan, chunks: pa.Table, parent_mask: np.ndarray | None,
                  parent_keys: np.ndarray | None, by_key: dict[int, ChunkRow]) -> None:
    """Full-precision vectors aligned with the chunk table: the parent's kept rows copied in one pass,
    then the rewritten rows (from the cache when new, from the parent when kept)."""
    fresh_keys = [r.chunk_key for r in plan.rows]
    matrix = allocate_matrix(path, (chunks.num_rows, plan.dim))
    start = 0
    parent_of: dict[int, int] = {}
    if parent_mask is not None:
        assert plan.parent_dir is not None
        parent_matrix = np.load(plan.parent_dir / MATRIX_FILE, mmap_mode="r")
        kept = int(parent_mask.sum())
        matrix[:kept] = parent_matrix[parent_mask]
        start = kept
        if parent_keys is not None and any(by_key[k].chunk_hash not in plan.vectors for k in fresh_keys):
            parent_of = {int(k): i for i, k in enumerate(parent_keys.tolist())}
    for i, key in enumerate(fresh_keys):
        vector = plan.vectors.get(by_key[key].chunk_hash)
        matrix[start + i] = vector if vector is not None else parent_matrix[parent_of[key]]
    matrix.flush()
    del matrix


def _vector_matrix(keys: Sequence[int], by_key: dict[int, ChunkRow], plan: BuildPlan) -> np.ndarray:
    matrix = np.empty((len(keys), plan.dim), dtype=np.float32)
    for i, key in enumerate(keys):
        matrix[i] = plan.vectors[by_key[key].chunk_hash]
    return matrix


def _write_hnsw(path: Path, plan: BuildPlan, keys: Sequence[int], by_key: dict[int, ChunkRow],
                live: int) -> tuple[dict[str, int], Any]:
    import hnswlib

    index = hnswlib.Index(space=METRIC, dim=plan.dim)
    if plan.full:
        index.init_index(max_elements=max(1, len(keys)), M=plan.hnsw.m, ef_construction=plan.hnsw.ef_construction,
                         allow_replace_deleted=True)
    else:
        assert plan.parent_dir is not None
        index.load_index(str(plan.parent_dir / VECTORS_FILE), allow_replace_deleted=True)
        for key in plan.removed_keys:
            index.mark_deleted(key)
        needed = index.get_current_count() + len(keys)  # freed slots are reused, but never counted on
        if needed > index.get_max_elements():
            index.resize_index(max(needed, int(index.get_max_elements() * 1.25)))
    if keys:
        index.add_items(_vector_matrix(keys, by_key, plan), np.asarray(keys, dtype=np.int64),
                        replace_deleted=not plan.full)
    index.save_index(str(path))
    check_hnsw_written(path)
    stored = index.get_current_count()
    info = {"max_elements": int(index.get_max_elements()), "stored": int(stored), "tombstones": int(stored - live)}
    return info, index


def rewrite_as_whole_copy(registry: Any, artifacts: Path, index: str, version: str, model_id: str) -> dict[str, Any]:
    """Replace the files of a published version by a whole copy of the same chunks (format 2), as
    ragpipe wrote versions before segments; return its manifest (also recorded in the registry)."""
    import shutil

    row = registry.get_version(version)
    rows = registry.member_rows(index, row.version_seq)
    vectors = registry.fetch_embeddings(model_id, sorted({r.chunk_hash for r in rows}))
    directory = artifacts / index / version
    shutil.rmtree(directory)
    directory.mkdir()
    plan = BuildPlan(index=index, version=version, parent_version=None, parent_dir=None, run_id=row.run_id or 0,
                     model_id=model_id, dim=len(next(iter(vectors.values()))), chunker_version="whole-copy",
                     rows=rows, doc_fields=registry.document_fields(index), vectors=vectors)
    manifest, _ = build_version(directory, plan)
    registry.mark_version_built(version, row.artifact_uri, manifest)
    return manifest

"""Validate stage: a version is published only if its files agree with each other and the registry.

Structural checks (invariants 2 and 5 of the design): the chunk keys in the HNSW index, the BM25
tables, the chunk table and the registry's rows for the version are one set; counts match the
manifest; the model is the one the manifest names; no chunk belongs to a document that is gone; the
files match their manifest checksums. Quality checks: HNSW recall@10 against exact search on a sample
of the version's own vectors, and, when configured, recall@k on a golden query set, which may not fall
more than a set margin below the live version's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from retrieval.artifacts import CHUNKS_FILE, MANIFEST, MATRIX_FILE, VECTORS_FILE, file_problems
from retrieval.bm25 import POSTINGS_FILE

RECALL_SAMPLE = 200
ENCODER_SAMPLE = 8
ENCODER_MIN_COSINE = 0.99999


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Thresholds:
    min_recall: float = 0.95
    ef_search: int = 100
    golden_k: int = 10
    golden_min_recall: float = 0.0
    golden_max_drop: float = 0.05


def load_hnsw(directory: Path, manifest: dict[str, Any]):  # type: ignore[no-untyped-def]
    import hnswlib

    index = hnswlib.Index(space=manifest["metric"], dim=manifest["model"]["dim"])
    index.load_index(str(directory / VECTORS_FILE))
    return index


def check_structure(
    directory: Path,
    manifest: dict[str, Any],
    registry_keys: set[int],
    *,
    model_id: str,
    live_doc_ids: Collection[str] | None = None,
    checksums: bool = True,
    index: Any = None,
) -> tuple[list[str], Any, np.ndarray]:
    """Structural invariants; returns (problems, the loaded HNSW index, the chunk keys).

    Every file the manifest lists must exist with its size and SHA-256; ``checksums=False`` checks
    sizes only (right after a build that computed the checksums). Damaged files end the checks.
    """
    problems = file_problems(directory, manifest.get("files", {}), checksums=checksums)
    if problems:
        return problems, None, np.zeros(0, dtype=np.int64)
    chunks = pq.read_table(directory / CHUNKS_FILE, columns=["chunk_key", "doc_id"])
    keys = chunks.column("chunk_key").to_numpy()
    table_keys = set(keys.tolist())
    if len(table_keys) != len(keys):
        problems.append("chunk table holds duplicate chunk keys")
    if table_keys != registry_keys:
        problems.append(
            f"chunk table and registry differ: {len(table_keys - registry_keys)} keys only in the table, "
            f"{len(registry_keys - table_keys)} only in the registry"
        )
    bm25_keys = set(pq.read_table(directory / POSTINGS_FILE, columns=["chunk_key"]).column("chunk_key").to_pylist())
    if bm25_keys != table_keys:
        problems.append(f"BM25 and chunk table differ by {len(bm25_keys ^ table_keys)} keys")
    if index is None:
        index = load_hnsw(directory, manifest)
    stored = set(int(k) for k in index.get_ids_list())
    if not table_keys <= stored:
        problems.append(f"{len(table_keys - stored)} chunk keys have no vector in the HNSW index")
    dead = stored - table_keys
    alive_dead = [k for k in dead if _retrievable(index, k)]
    if alive_dead:
        problems.append(f"{len(alive_dead)} HNSW vectors are searchable but not in the version (e.g. {alive_dead[0]})")
    if manifest["counts"]["chunks"] != len(keys):
        problems.append(f"manifest counts {manifest['counts']['chunks']} chunks, the table holds {len(keys)}")
    if manifest["model"]["id"] != model_id:
        problems.append(f"manifest names model {manifest['model']['id']!r}, the version was built with {model_id!r}")
    if index.dim != manifest["model"]["dim"]:
        problems.append(f"HNSW dimension {index.dim} differs from the manifest's {manifest['model']['dim']}")
    matrix = np.load(directory / MATRIX_FILE, mmap_mode="r")
    if matrix.shape != (len(keys), manifest["model"]["dim"]):
        problems.append(f"full-precision vectors have shape {matrix.shape}, expected ({len(keys)}, {manifest['model']['dim']})")
    elif len(keys) and table_keys <= stored:
        rows = np.random.default_rng(1).choice(len(keys), size=min(64, len(keys)), replace=False)
        hnsw = np.asarray(index.get_items(keys[rows].tolist()), dtype=np.float32)
        if not np.allclose(hnsw, matrix[rows], atol=1e-6):
            problems.append("full-precision vectors differ from the HNSW index's vectors")
    if live_doc_ids is not None:
        gone = set(chunks.column("doc_id").to_pylist()) - set(live_doc_ids)
        if gone:
            problems.append(f"{len(gone)} documents that are gone still have chunks (e.g. {sorted(gone)[0]!r})")
    return problems, index, keys


def _retrievable(index: Any, key: int) -> bool:
    try:
        index.get_items([key])
        return True
    except RuntimeError:
        return False


def hnsw_recall(index: Any, keys: np.ndarray, vectors: np.ndarray, ef: int, k: int = 10,
                sample: int = RECALL_SAMPLE) -> float:
    """Recall@k of HNSW against exact inner-product search, queries sampled from the version's vectors.

    ``vectors`` are the version's full-precision vectors, row i for ``keys[i]``.
    """
    if len(keys) == 0:
        return 1.0
    rng = np.random.default_rng(0)
    rows = rng.choice(len(keys), size=min(sample, len(keys)), replace=False)
    return recall_against_exact(index, vectors, np.asarray(vectors[rows], dtype=np.float32), ef, k)


def recall_against_exact(index: Any, vectors: np.ndarray, queries: np.ndarray, ef: int, k: int = 10) -> float:
    """Mean recall@k of the HNSW ``index`` at ``ef`` for ``queries``, against exact search over ``vectors``.

    A returned neighbour counts when its score reaches the exact k-th best score, so that ties
    (duplicate texts, equally near neighbours, short queries) never count as misses.
    """
    k = min(k, len(vectors))
    if k == 0 or len(queries) == 0:
        return 1.0
    exact = queries @ np.asarray(vectors, dtype=np.float32).T
    kth = -np.partition(-exact, k - 1, axis=1)[:, k - 1]
    index.set_ef(max(ef, k))
    _, distances = index.knn_query(queries, k=k)
    scores = 1.0 - distances  # hnswlib's inner-product distance is 1 - <q, v>
    hits = (scores >= kth[:, None] - 1e-5).sum()
    return float(hits) / (len(queries) * k)


def query_encoder_agreement(
    directory: Path, embed_documents: Callable[[list[str]], np.ndarray],
    embed_queries: Callable[[list[str]], np.ndarray], sample: int = ENCODER_SAMPLE,
) -> float:
    """The lowest cosine between the document embedder's and the stored query encoder's vectors of a
    sample of the version's chunk texts: the stored encoder must encode as the documents were."""
    texts = pq.read_table(directory / CHUNKS_FILE, columns=["text"]).column("text").to_pylist()
    if not texts:
        return 1.0
    rows = np.random.default_rng(2).choice(len(texts), size=min(sample, len(texts)), replace=False)
    probe = [texts[int(r)] for r in rows]
    a, b = embed_documents(probe), embed_queries(probe)
    return float((np.asarray(a, dtype=np.float32) * np.asarray(b, dtype=np.float32)).sum(axis=1).min())


def golden_recall(
    path: Path, index: Any, directory: Path, embed: Callable[[list[str]], np.ndarray], k: int, ef: int
) -> float:
    """Mean recall@k of expected doc ids for a JSONL golden set (``query``, ``expected_doc_ids``)."""
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not cases:
        return 1.0
    chunks = pq.read_table(directory / CHUNKS_FILE, columns=["chunk_key", "doc_id"])
    doc_of = dict(zip(chunks.column("chunk_key").to_pylist(), chunks.column("doc_id").to_pylist()))
    vectors = embed([c["query"] for c in cases])
    n = min(len(doc_of), k * 5)
    if n == 0:
        return 0.0
    index.set_ef(max(ef, n))
    labels, _ = index.knn_query(vectors, k=n)
    total = 0.0
    for case, row in zip(cases, labels):
        docs: list[str] = []
        for label in row:
            d = doc_of.get(int(label))
            if d is not None and d not in docs:
                docs.append(d)
        expected = set(case["expected_doc_ids"])
        total += len(expected & set(docs[:k])) / max(1, len(expected))
    return total / len(cases)


def validate_version(
    directory: Path,
    registry_keys: set[int],
    *,
    model_id: str,
    live_doc_ids: Collection[str],
    thresholds: Thresholds,
    golden_set: Path | None = None,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    live_metrics: dict[str, Any] | None = None,
    index: Any = None,
    query_encoder: Callable[[], Callable[[list[str]], np.ndarray]] | None = None,
    embed_queries: Callable[[list[str]], np.ndarray] | None = None,
) -> ValidationReport:
    """Run every check on a freshly built version (``index``: its HNSW index when still in memory;
    ``query_encoder``: loads the stored query encoder the manifest names, whose vectors must equal
    ``embed``'s; ``embed_queries``: embeds the golden queries, default ``embed``)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    report = ValidationReport()
    problems, index, keys = check_structure(directory, manifest, registry_keys, model_id=model_id,
                                            live_doc_ids=live_doc_ids, checksums=False, index=index)
    report.problems.extend(problems)
    if index is None or problems:
        return report
    if query_encoder is not None and embed is not None and not check_query_encoder(
            report, lambda: query_encoder_agreement(directory, embed, query_encoder())):
        return report
    recall = hnsw_recall(index, keys, np.load(directory / MATRIX_FILE, mmap_mode="r"), thresholds.ef_search)
    report.metrics["hnsw_recall_at_10"] = round(recall, 4)
    if recall < thresholds.min_recall:
        report.problems.append(f"HNSW recall@10 {recall:.3f} < {thresholds.min_recall:.2f}")
    if golden_set is not None and embed is not None:
        score = golden_recall(golden_set, index, directory, embed_queries or embed, thresholds.golden_k,
                              thresholds.ef_search)
        report.metrics["golden_recall"] = round(score, 4)
        if score < thresholds.golden_min_recall:
            report.problems.append(f"golden recall@{thresholds.golden_k} {score:.3f} < {thresholds.golden_min_recall:.2f}")
        live = (live_metrics or {}).get("golden_recall")
        if live is not None and score < live - thresholds.golden_max_drop:
            report.problems.append(
                f"golden recall@{thresholds.golden_k} {score:.3f} fell more than {thresholds.golden_max_drop:.2f} "
                f"below the live version's {live:.3f}"
            )
    return report


def check_query_encoder(report: "ValidationReport", agreement: Callable[[], float]) -> bool:
    """Record how closely the stored query encoder agrees with the document embedder (the lowest
    cosine over the sample ``agreement`` measures); False when the version must be rejected
    because the encoder does not load or run."""
    try:
        cosine = agreement()
    except Exception as exc:  # a stored encoder that cannot load or run rejects the version
        report.problems.append(f"the stored query encoder does not load: {exc}")
        return False
    report.metrics["query_encoder_min_cosine"] = round(cosine, 6)
    if cosine < ENCODER_MIN_COSINE:
        report.problems.append(f"the stored query encoder's vectors differ from the documents' "
                               f"(cosine {cosine:.6f} < {ENCODER_MIN_COSINE})")
    return True

"""``ragpipe eval``: index a BEIR-layout data set into a throwaway index and measure retrieval.

Metrics are document-level, as BEIR judges documents: a document's rank is that of its best chunk.
nDCG@10 uses the graded judgements as gains (linear, as trec_eval); Recall@100 and MRR@10 count any
positive grade as relevant.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.chunking import DEFAULT_CONTEXT
from pipeline.config import IndexConfig
from pipeline.embedding import Embedder
from pipeline.errors import ConfigError
from pipeline.runner import run_index
from pipeline.sources import scan_records
from registry import Registry, RegistryConfig
from registry.db import scratch_database

MODES = {
    "bm25": {"retrievers": "bm25", "reranker": "none"},
    "dense": {"retrievers": "vector", "reranker": "none"},
    "hybrid": {"retrievers": "hybrid", "reranker": "none"},
    "hybrid+rerank": {},  # the library's defaults
}


def load_beir(
    directory: Path,
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]], dict[str, str]]:
    """(documents: id -> "title\\n\\ntext", queries: id -> text, qrels: query id -> {doc id: grade},
    titles: id -> title). See :func:`corpus_formats` for the documents' formats."""
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory} is not a BEIR data set: {name} is missing")
    docs, titles = {}, {}
    with open(directory / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            title, text = (d.get("title") or "").strip(), (d.get("text") or "").strip()
            docs[str(d["_id"])] = f"{title}\n\n{text}".strip()
            titles[str(d["_id"])] = title
    queries = {}
    with open(directory / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(directory / "qrels" / "test.tsv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            grade = int(row["score"])
            if grade > 0:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = grade
    return docs, {q: t for q, t in queries.items() if q in qrels}, qrels, titles


def corpus_formats(directory: Path) -> dict[str, str]:
    """Each document's format: ``format`` of its corpus.jsonl record (an addition to the BEIR layout,
    for structured documents such as reStructuredText), else ``text``."""
    formats = {}
    with open(directory / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            formats[str(d["_id"])] = str(d.get("format") or "text")
    return formats


def ndcg_at(ranked: Sequence[str], grades: Mapping[str, int], k: int = 10) -> float:
    """nDCG with the grade itself as gain, as trec_eval and pytrec_eval (hence BEIR) compute it."""
    dcg = sum(grades.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: Sequence[str], grades: Mapping[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(grades)) / len(grades) if grades else 0.0


def mrr_at(ranked: Sequence[str], grades: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if d in grades:
            return 1.0 / (i + 1)
    return 0.0


def documents_in_order(hits: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for hit in hits:
        seen.setdefault(hit.doc_id, None)
    return list(seen)


def evaluate(
    dataset: Path, registry_config: RegistryConfig, embedder: Embedder, modes: Sequence[str],
    limit_queries: int | None = None, retrieval: dict[str, Any] | None = None, chunk_context: str = DEFAULT_CONTEXT,
) -> dict[str, Any]:
    """Index ``dataset`` once (chunks indexed with ``chunk_context``), then score every mode on its queries."""
    from retrieval import Retriever

    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    docs, queries, qrels, titles = load_beir(dataset)
    formats = corpus_formats(dataset)
    query_ids = list(queries)[:limit_queries] if limit_queries else list(queries)
    results: dict[str, Any] = {"dataset": str(dataset), "documents": len(docs), "queries": len(query_ids),
                               "model_id": embedder.model_id, "chunk_context": chunk_context, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ragpipe-eval-") as tmp, \
            scratch_database(registry_config.database_url, registry_config.home) as url:
        config = IndexConfig(index="eval", artifacts=str(Path(tmp) / "artifacts"), lock_timeout=0,
                             chunk_context=chunk_context)
        records = ((d, text, {"format": formats[d], "title": titles[d]} if titles[d] else {"format": formats[d]})
                   for d, text in docs.items())
        scan = scan_records(records, dataset.resolve().as_uri())
        with Registry.open(RegistryConfig(database_url=url, home=Path(tmp))) as registry:
            started = time.perf_counter()
            summary = run_index(scan, registry, embedder, config)
            results["index_seconds"] = round(time.perf_counter() - started, 1)
            results["chunks"] = summary.chunks["active"]
            results["documents_skipped"] = len(summary.skipped)
        for mode in modes:
            settings = {**(retrieval or {}), **MODES[mode], "follow": False, "result_cache_size": 0}
            with Retriever.open("eval", database_url=url, home=tmp, **settings) as retriever:
                retriever.search(queries[query_ids[0]], k=10)  # load the encoder before timing
                ndcg, recall, mrr, latency = [], [], [], []
                for qid in query_ids:
                    started = time.perf_counter()
                    hits = retriever.search(queries[qid], k=200)
                    latency.append((time.perf_counter() - started) * 1000)
                    ranked = documents_in_order(hits)
                    ndcg.append(ndcg_at(ranked, qrels[qid]))
                    recall.append(recall_at(ranked, qrels[qid]))
                    mrr.append(mrr_at(ranked, qrels[qid]))
            ordered = sorted(latency)
            results["modes"][mode] = {
                "ndcg@10": round(statistics.mean(ndcg), 4),
                "recall@100": round(statistics.mean(recall), 4),
                "mrr@10": round(statistics.mean(mrr), 4),
                "latency_p50_ms": round(ordered[len(ordered) // 2], 2),
                "latency_p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 2),
            }
    return results

"""Query benchmark: hybrid search latency and throughput over a large published version.

The version holds N chunks of real sentences (from the shared data) embedded with the deterministic
embedder, so that building it takes minutes, not hours. Queries are the Cranfield queries, encoded by
the real all-MiniLM-L6-v2 (ONNX Runtime or torch) and relabelled with the version's model id: the
timings are those of a real query path (real encoder, HNSW over N vectors of the same dimension,
BM25 over N chunks, fusion, reranking), while the results themselves mean nothing. No caches.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deterministic import DeterministicEmbedder
from benchmarks.noop import _sentences
from benchmarks.publish import make_docs
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from pipeline.sources import scan_records
from pipeline.validation import recall_against_exact
from registry import Registry, RegistryConfig
from registry.db import scratch_database


class Relabelled:
    """A real encoder presented under another model id (timing only)."""

    def __init__(self, inner: Any, model_id: str) -> None:
        self.inner = inner
        self.model_id = model_id

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.inner.embed(texts)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 2)}


def _rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class _FallbackCounter(logging.Handler):
    """Counts the retriever's fall-backs from HNSW to exact search."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "fewer than" in record.getMessage():
            self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def version_recall(loaded: Any, queries: np.ndarray, ef: int | None, k: int = 10) -> float:
    """Recall@k of a loaded version's vector search at ``ef`` (None: each segment's recorded breadth)
    against exact search over its live vectors, tie-aware as validation counts."""
    if not hasattr(loaded, "segmented"):  # a whole-copy version: one graph, one matrix
        return recall_against_exact(loaded.hnsw, loaded.matrix, queries, ef or 100, k)
    version = loaded.segmented
    keys = version.live_keys()
    exact = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(keys), 65536):  # in blocks: bounded memory at any size
        scores = queries @ version.vectors_of(keys[start:start + 65536]).T
        exact = -np.partition(-np.concatenate([exact, scores], axis=1), min(k, exact.shape[1] + scores.shape[1]) - 1,
                              axis=1)[:, :k]
    kth = exact.min(axis=1)
    hits = 0
    for query, threshold in zip(queries, kth):
        _, distances = version.knn(query, k, ef)
        hits += int(((1.0 - distances) >= threshold - 1e-5).sum())
    return hits / (len(queries) * k)


def measure(shared: Path, url: str, home: str | Path, index: str, *, ef: int | None = 100,
            backends: tuple[str, ...] = ("onnx",), also_hold: str | None = None) -> dict[str, Any]:
    """Query latency and throughput of the version ``index`` serves, with and without the reranker.

    Queries are the Cranfield queries, encoded by the real model and relabelled with the version's
    model id. Reports single-query p50/p95 per (encoder, reranker), ``search_many`` of 32 against 32
    sequential searches (medians of 5 alternated rounds), and HNSW recall@10 against exact search at ``ef`` and around it, for the
    queries embedded in the version's own vector space.
    """
    from retrieval import Retriever
    from retrieval.models import SentenceTransformerEmbedder
    from pipeline.encoders import OnnxModelEncoder

    queries = [json.loads(line)["text"] for line in open(shared / "cranfield" / "queries.jsonl", encoding="utf-8")]
    model_id = DeterministicEmbedder().model_id
    encoders = {"onnx": lambda: OnnxModelEncoder("sentence-transformers/all-MiniLM-L6-v2", Path(home) / "cache"),
                "torch": lambda: SentenceTransformerEmbedder(device="cpu")}
    out: dict[str, Any] = {"queries": len(queries), "ef": ef}
    fallbacks = _FallbackCounter()
    logging.getLogger("retrieval.retriever").addHandler(fallbacks)
    logging.getLogger("retrieval.retriever").setLevel(logging.INFO)
    for backend in backends:
        encoder = Relabelled(encoders[backend](), model_id)
        for reranker in ("exact", "none"):
            with Retriever.open(index, url, home=home, encoder=encoder, follow=False, reranker=reranker, ef=ef,
                                result_cache_size=0, query_cache_size=0) as retriever:
                out.setdefault("chunks", retriever._current.size)
                for q in queries[:5]:
                    retriever.search(q, k=10)  # warm up
                latency = []
                for q in queries:
                    started = time.perf_counter()
                    retriever.search(q, k=10)
                    latency.append((time.perf_counter() - started) * 1000)
                entry: dict[str, Any] = {"single": percentiles(latency)}
                batch = queries[:32]
                sequential_runs, many_runs = [], []
                for _ in range(5):  # alternated, medians: one round is at the mercy of a noisy neighbour
                    started = time.perf_counter()
                    for q in batch:
                        retriever.search(q, k=10)
                    sequential_runs.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    retriever.search_many(batch, k=10)
                    many_runs.append(time.perf_counter() - started)
                sequential, many = statistics.median(sequential_runs), statistics.median(many_runs)
                entry["sequential_32_qps"] = round(32 / sequential, 1)
                entry["search_many_32_qps"] = round(32 / many, 1)
                entry["search_many_speedup"] = round(sequential / many, 2)
                entry["exact_search_fallbacks"] = fallbacks.take()  # graph gave too few neighbours
                out[f"{backend}+{reranker}"] = entry
                if "serving_rss_mb" not in out:
                    # what serving takes (version loaded, encoder, all queries run), before the recall
                    # check below reads the whole vector matrix and holds an exact score matrix
                    out["serving_rss_mb"] = _rss_mb()
                    loaded = retriever._current
                    if also_hold is not None:  # the previous version too, as a retriever holds it after a swap
                        held = retriever._load(retriever._info(also_hold))
                        for q in queries:
                            retriever._search_on(held, q, None, 10, None)
                        out["serving_rss_mb_two_versions"] = _rss_mb()
                        out["segments_loaded_two_versions"] = len(retriever.segments.loaded)
                    own = DeterministicEmbedder().embed(queries)  # the version's own vector space
                    out["hnsw_recall_at_10"] = {
                        str(e): round(version_recall(loaded, own, e), 4) for e in sorted({50, 100, 200, ef or 100})}
                    if hasattr(loaded, "segmented"):
                        out["hnsw_recall_at_10"]["recorded"] = round(version_recall(loaded, own, None), 4)
                        out["ef_recorded"] = {ref.name: ref.ef for ref in loaded.version_manifest.segments}
    return out


def run(shared: Path, size: int, registry_config: RegistryConfig, ef: int = 100) -> dict[str, Any]:
    docs = make_docs(_sentences(shared), size, seed=size)
    embedder = DeterministicEmbedder()
    out: dict[str, Any] = {"benchmark": "query", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="ragpipe-query-") as tmp, \
            scratch_database(registry_config.database_url, registry_config.home) as url:
        config = IndexConfig(index="bench", artifacts=str(Path(tmp) / "artifacts"), min_recall=0.9)
        with Registry.open(RegistryConfig(database_url=url, home=Path(tmp))) as registry:
            started = time.perf_counter()
            run_index(scan_records(((d, t, {}) for d, t in docs.items()), "bench"), registry, embedder, config)
            out["build_seconds"] = round(time.perf_counter() - started, 1)
        out.update(measure(shared, url, tmp, "bench", ef=ef, backends=("onnx", "torch")))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks query", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--ef", type=int, default=100, help="HNSW search breadth")
    parser.add_argument("--shared-data", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    print(json.dumps(run(shared_data_dir(args.shared_data), args.chunks, RegistryConfig.from_env(), args.ef), indent=2))
    return 0

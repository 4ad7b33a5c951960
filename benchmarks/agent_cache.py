"""Agent cache benchmark: hit rate, speed-up and result overlap of the exact and semantic caches.

An index of the first N Cranfield documents (``title + text``), embedded by the real model (or the
deterministic embedder, for the mechanics only), serves the agent-style trace of
``benchmarks.agent_trace``: each Cranfield query, its exact repeat and four rephrasings. The trace
runs once with no cache at all (the reference results and times), then once per cache setting:
exact caches only, and exact plus semantic at each cosine. For semantic hits it reports overlap@10
with the uncached results of the query asked, and how many came from another real query.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import shared_data_dir
from benchmarks.agent_trace import KINDS, TraceQuery, build_trace, load_queries
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from pipeline.sources import scan_records
from registry import Registry, RegistryConfig
from registry.db import scratch_database
from retrieval.rollout import overlap_at_10


def build_index(cranfield: Path, docs: int, url: str, home: Path, artifacts: str, embedder: Any) -> dict[str, Any]:
    rows = [json.loads(line) for line in open(cranfield / "corpus.jsonl", encoding="utf-8")][:docs]
    records = ((f"cran/{r['_id']}", f"{r['title']}\n\n{r['text']}".strip(), {}) for r in rows)
    started = time.perf_counter()
    with Registry.open(RegistryConfig(database_url=url, home=home)) as registry:
        summary = run_index(scan_records(records, "cranfield"), registry, embedder,
                            IndexConfig(index="cran", artifacts=artifacts, lock_timeout=5))
    return {"documents": docs, "chunks": summary.chunks["active"], "model_id": summary.model_id,
            "build_seconds": round(time.perf_counter() - started, 1)}


def serve(trace: list[TraceQuery], url: str, home: Path, encoder: Any, **config: Any) -> tuple[list[Any], list[float], dict]:
    """The trace through one fresh retriever: hits and milliseconds per query, cache counters."""
    from retrieval import Retriever

    with Retriever.open("cran", url, home=home, encoder=encoder, follow=False, stats_interval=0, **config) as r:
        r.search("warm up the encoder and the version", k=10)
        hits, times = [], []
        for item in trace:
            started = time.perf_counter()
            hits.append(r.search(item.text, k=10))
            times.append((time.perf_counter() - started) * 1000)
        counters = {name: {"hits": c.hits, "misses": c.misses} for name, c in r.cache_counters().items()}
    return hits, times, counters


def _embed_p50(trace: list[TraceQuery], encoder: Any, url: str, home: Path) -> float:
    """Median milliseconds of encoding one query alone (what a semantic hit still costs)."""
    from retrieval import Retriever

    with Retriever.open("cran", url, home=home, encoder=encoder, follow=False, stats_interval=0,
                        query_cache_size=0) as r:
        version = r._current
        times = []
        for item in trace[:300]:
            started = time.perf_counter()
            r._embed([item.text], version)
            times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def judge(trace: list[TraceQuery], hits: list[Any], times: list[float], reference: dict[str, Any],
          baseline_ms: float) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    overlaps, wrong = [], 0
    source_of = {t.text: t.source_id for t in trace}
    for item, got in zip(trace, hits):
        by_kind[item.kind][got.cache or "miss"] += 1
        if got.cache == "semantic":
            overlaps.append(overlap_at_10(got, reference[item.text]))
            wrong += source_of.get(got.cached_query) != item.source_id
    total = sum(times)
    served = Counter(h.cache or "miss" for h in hits)
    by_outcome: dict[str, list[float]] = {}
    for got, ms in zip(hits, times):
        by_outcome.setdefault(got.cache or "searched", []).append(ms)
    return {
        "hit_rate": round((served["exact"] + served["semantic"]) / len(trace), 3),
        "exact_hits": served["exact"], "semantic_hits": served["semantic"], "misses": served["miss"],
        "semantic_hits_by_kind": {k: c["semantic"] for k, c in by_kind.items()},
        "semantic_overlap_at_10_mean": round(statistics.mean(overlaps), 3) if overlaps else None,
        "semantic_overlap_at_10_min": round(min(overlaps), 3) if overlaps else None,
        "semantic_hits_from_another_query": wrong,
        "total_ms": round(total, 1), "p50_ms": round(statistics.median(times), 2),
        "p50_ms_by_outcome": {k: round(statistics.median(v), 2) for k, v in sorted(by_outcome.items())},
        "speed_up": round(baseline_ms / total, 2),
    }


def run(shared: Path, docs: int, queries: int | None, cosines: list[float], embedder_name: str,
        registry_config: RegistryConfig) -> dict[str, Any]:
    cranfield = shared / "cranfield"
    trace = build_trace(load_queries(cranfield, queries))
    if embedder_name == "deterministic":
        from pipeline.deterministic import DeterministicEmbedder

        embedder: Any = DeterministicEmbedder()
        encoder = embedder
    else:
        from pipeline.embedding import make_embedder

        embedder, encoder = make_embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu"), None
    out: dict[str, Any] = {"embedder": embedder_name, "trace": {"queries": len(trace), **Counter(t.kind for t in trace)}}
    with tempfile.TemporaryDirectory(prefix="ragpipe-agent-") as artifacts, \
            scratch_database(registry_config.database_url, registry_config.home) as url:
        out["index"] = build_index(cranfield, docs, url, registry_config.home, artifacts, embedder)
        none = {"query_cache_size": 0, "result_cache_size": 0, "semantic_cache_size": 0}
        ref_hits, ref_times, _ = serve(trace, url, registry_config.home, encoder, **none)
        reference = {item.text: h for item, h in zip(trace, ref_hits)}
        baseline = sum(ref_times)
        out["uncached"] = {"total_ms": round(baseline, 1), "p50_ms": round(statistics.median(ref_times), 2),
                           "p50_embed_ms": _embed_p50(trace, encoder, url, registry_config.home)}
        hits, times, counters = serve(trace, url, registry_config.home, encoder)
        out["exact_only"] = {**judge(trace, hits, times, reference, baseline), "counters": counters}
        out["semantic"] = []
        for cosine in cosines:
            hits, times, counters = serve(trace, url, registry_config.home, encoder,
                                          semantic_cache_size=4096, semantic_cache_cosine=cosine)
            out["semantic"].append({"cosine": cosine, **judge(trace, hits, times, reference, baseline),
                                    "counters": counters})
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks agent_cache", description=__doc__)
    parser.add_argument("--shared-data", type=Path)
    parser.add_argument("--docs", type=int, default=1000, help="Cranfield documents indexed (default 1000)")
    parser.add_argument("--queries", type=int, help="Cranfield queries the trace derives from (default all 225)")
    parser.add_argument("--cosines", default="0.8,0.85,0.9,0.92,0.95,0.97")
    parser.add_argument("--embedder", choices=["model", "deterministic"], default="model")
    parser.add_argument("--database-url")
    parser.add_argument("--home", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ragpipe-agent-home-") as tmp:
        config = RegistryConfig.from_env(database_url=args.database_url, home=args.home or Path(tmp))
        result = run(shared_data_dir(args.shared_data), args.docs, args.queries,
                     [float(c) for c in args.cosines.split(",")], args.embedder, config)
    print(json.dumps(result, indent=2))
    return 0

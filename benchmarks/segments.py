"""Segments benchmark: one segment against ten, a 1% change as a small segment plus deletion sets, and
what versions that share segments cost a process.

A synthetic corpus (``pipeline.deterministic``: Zipf-distributed words, feature-hashed vectors) is
written as one segment and as ten, each streamed in batches and each segment's search breadth
measured for ``RAGPIPE_MIN_RECALL``. Then 1% of the chunks change (their keys deleted, their new
versions added): the change is one small segment plus a deletion set per touched segment, and the
bytes it adds are compared with a whole copy of the version. Queries (hybrid: HNSW top-50 minus
deletions, BM25 top-50 with collection-wide statistics, RRF) are timed over the layouts, with the
deletions skipped by hnswlib's filter or by over-fetching. Resident memory is measured in fresh
processes holding one version, two adjacent versions sharing their segments, and two versions
loaded separately (what whole copies cost). Query embedding is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.query import percentiles
from pipeline.config import IndexConfig
from pipeline.deterministic import DeterministicEmbedder, synthetic_chunk_table, synthetic_texts
from pipeline.segments.writer import SegmentParams, SegmentWriter
from retrieval.bm25 import ANALYZER_VERSION, B, K1
from retrieval.segments import SegmentPool, SegmentRef, SegmentStore, SegmentedVersion, VersionManifest

BATCH = 5000
VOCABULARY = 50_000


def _bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
               if p.is_file())


def query_texts(start: int, count: int) -> list[str]:
    return synthetic_texts(start, count, vocabulary=VOCABULARY, words=(3, 12))


class Corpus:
    """Texts and vectors by key range, generated once and kept on disk (the vectors in a .npy)."""

    def __init__(self, workdir: Path, chunks: int, dim: int) -> None:
        self.embedder = DeterministicEmbedder(dim=dim)
        self.chunks, self.dim = chunks, dim
        self.vectors = np.lib.format.open_memmap(workdir / "corpus_vectors.npy", "w+", np.float32, (chunks, dim))
        started = time.perf_counter()
        for at in range(0, chunks, BATCH):
            self.vectors[at:at + BATCH] = self.embedder.embed(self.texts(at, min(BATCH, chunks - at)))
        self.embed_seconds = time.perf_counter() - started
        # query-like texts (3-12 words) that measure each segment's breadth; the timed queries are others
        self.tuning_queries = self.embedder.embed(query_texts(700_000_000, 200))

    def texts(self, start: int, count: int) -> list[str]:
        return synthetic_texts(start, count, vocabulary=VOCABULARY)

    def params(self) -> SegmentParams:
        return SegmentParams(model_id=self.embedder.model_id, dim=self.dim)


def write_range(store: SegmentStore, corpus: Corpus, keys: np.ndarray, text_ids: np.ndarray, vectors: np.ndarray,
                target: float) -> tuple[SegmentRef, float, dict[str, Any]]:
    """One segment of the chunks ``keys`` (texts ``text_ids``), its breadth measured with the
    corpus's tuning queries; (ref, writer seconds, its figures)."""
    seconds = 0.0
    with SegmentWriter(store, corpus.params(), expected_rows=len(keys)) as writer:
        for at in range(0, len(keys), BATCH):
            ids = text_ids[at:at + BATCH]  # consecutive
            texts = corpus.texts(int(ids[0]), len(ids))
            table = synthetic_chunk_table(keys[at:at + BATCH].tolist(), texts)
            started = time.perf_counter()
            writer.add(table, vectors[at:at + BATCH])
            seconds += time.perf_counter() - started
        started = time.perf_counter()
        manifest = writer.finish(recall_target=target, recall_queries=corpus.tuning_queries)
        seconds += time.perf_counter() - started
    info = {"rows": manifest.rows, "ef": manifest.ef_search, "recall_at_ef": manifest.recall_at_ef,
            "bytes": sum(i.bytes for i in manifest.files.values())}
    return SegmentRef(manifest.name, manifest.rows), seconds, info


def version(corpus: Corpus, name: str, refs: list[SegmentRef]) -> VersionManifest:
    return VersionManifest(index="bench", version=name, model_id=corpus.embedder.model_id, dim=corpus.dim, metric="ip",
                           analyzer=ANALYZER_VERSION, k1=K1, b=B, hnsw_m=16, hnsw_ef_construction=200,
                           segments=tuple(refs))


def build_layout(store: SegmentStore, corpus: Corpus, parts: int, target: float) -> dict[str, Any]:
    keys = np.arange(corpus.chunks, dtype=np.int64)
    refs, seconds, segments = [], 0.0, []
    for bounds in np.array_split(keys, parts):
        ref, took, info = write_range(store, corpus, bounds, bounds, corpus.vectors[bounds[0]:bounds[-1] + 1], target)
        refs.append(ref)
        seconds += took
        segments.append(info)
    return {"refs": refs, "seconds": round(seconds, 1), "segments": segments,
            "bytes": sum(s["bytes"] for s in segments)}


def change(store: SegmentStore, corpus: Corpus, pool: SegmentPool, base: VersionManifest, name: str,
           share: float, target: float) -> tuple[VersionManifest, dict[str, Any]]:
    """1% of the chunks replaced: their keys deleted, new chunks (new keys, new texts) in one segment."""
    rng = np.random.default_rng(7)
    doomed = np.sort(rng.choice(corpus.chunks, size=max(1, int(corpus.chunks * share)), replace=False))
    new_keys = np.arange(corpus.chunks, corpus.chunks + len(doomed), dtype=np.int64)
    new_texts = new_keys + 10 * corpus.chunks  # texts no chunk had
    texts = synthetic_texts(int(new_texts[0]), len(new_texts), vocabulary=VOCABULARY)
    vectors = corpus.embedder.embed(texts)
    before = set(p.name for p in store.deletions_dir.glob("*")) if store.deletions_dir.is_dir() else set()
    started = time.perf_counter()
    ref, _, info = write_range(store, corpus, new_keys, new_texts, vectors, target)
    refs = []
    for old in base.segments:
        seg = pool.get(old.name)
        mine = doomed[(doomed >= seg.sorted_keys[0]) & (doomed <= seg.sorted_keys[-1])] if seg.rows else doomed[:0]
        refs.append(store.with_deletions(old, mine, seg.sorted_keys) if len(mine) else old)
    manifest = base.child(name, [*refs, ref])
    path = store.write_version(manifest)
    seconds = time.perf_counter() - started
    added = [store.segment_path(ref.name), path] + [store.deletions_dir / n for n in
                                                   sorted(set(p.name for p in store.deletions_dir.glob("*")) - before)]
    return manifest, {"chunks_deleted": len(doomed), "chunks_added": len(new_keys), "seconds": round(seconds, 2),
                      "bytes_added": _bytes(added), "deletion_files": len(added) - 2, "segment": info}


def time_queries(v: SegmentedVersion, queries: list[str], vectors: np.ndarray, **knn: Any) -> dict[str, Any]:
    hybrid, vector, bm25 = [], [], []
    for text, q in zip(queries, vectors):
        started = time.perf_counter()
        v.knn(q, 50, **knn)
        middle = time.perf_counter()
        v.bm25_top(text, 50)
        after = time.perf_counter()
        v.hybrid(text, q, k=10, candidates=50, ef=knn.get("ef"))
        hybrid.append((time.perf_counter() - after) * 1000)
        vector.append((middle - started) * 1000)
        bm25.append((after - middle) * 1000)
    return {"hybrid": percentiles(hybrid), "vector": percentiles(vector), "bm25": percentiles(bm25)}


def deletion_modes(store: SegmentStore, vectors: np.ndarray) -> dict[str, Any]:
    """Vector search over the ten segments with 1%, 10% and 30% of every segment's chunks deleted:
    hnswlib's filter callable against over-fetching, at breadth 100 and at the measured breadths."""
    base = store.read_version("base")
    pool = SegmentPool(store, verify=False)
    out: dict[str, Any] = {}
    for share in (0.01, 0.10, 0.30):
        refs = []
        for i, ref in enumerate(base.segments):
            keys = pool.get(ref.name).sorted_keys
            gone = np.random.default_rng(i).choice(keys, size=int(len(keys) * share), replace=False)
            refs.append(store.with_deletions(ref, gone, keys))
        manifest = base.child(f"deleted_{int(share * 100)}pct", refs)
        store.write_version(manifest)
        v = SegmentedVersion(manifest, pool)
        entry: dict[str, Any] = {}
        for ef in (100, None):
            for mode in ("filter", "overfetch"):
                times = []
                for q in vectors:
                    started = time.perf_counter()
                    v.knn(q, 50, ef=ef, deletions=mode)
                    times.append((time.perf_counter() - started) * 1000)
                entry[f"{mode}, ef {ef or 'measured'}"] = {**percentiles(times),
                                                           "recall_at_10": recall(v, vectors, ef, mode)}
        out[f"{int(share * 100)}% deleted"] = entry
    return out


def recall(v: SegmentedVersion, vectors: np.ndarray, ef: int | None = None, deletions: str = "filter") -> float:
    """Tie-aware recall@10 against exact search over the version's live vectors."""
    keys = v.live_keys()
    matrix = v.vectors_of(keys)
    exact = vectors @ matrix.T
    kth = -np.partition(-exact, 9, axis=1)[:, 9]
    hits = sum(int(((1.0 - v.knn(q, 10, ef=ef, deletions=deletions)[1]) >= t - 1e-5).sum()) for q, t in zip(vectors, kth))
    return round(hits / (10 * len(vectors)), 4)


def rss_probe(root: Path, versions: list[str], shared: bool, queries: int) -> dict[str, Any]:
    """Run in a fresh process: hold ``versions`` (one pool when ``shared``), query each, report memory."""
    from benchmarks.query import _rss_mb

    store = SegmentStore(root)
    pool = SegmentPool(store, verify=False)
    held = []
    for name in versions:
        held.append(SegmentedVersion(store.read_version(name), pool if shared else SegmentPool(store, verify=False)))
    texts = query_texts(900_000_000, queries)
    vectors = DeterministicEmbedder(dim=held[0].manifest.dim).embed(texts)
    for v in held:
        for text, q in zip(texts, vectors):
            v.hybrid(text, q)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = lambda key: round(int(status[key].split()[0]) / 1024, 1)  # noqa: E731
    return {"rss_mb": _rss_mb(), "anon_mb": mb("RssAnon"), "file_mb": mb("RssFile")}


def _probe(root: Path, versions: list[str], shared: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.segments", "--probe", str(root), "--shared", str(int(shared)),
                          *versions], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks segments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--change", type=float, default=0.01)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shared", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("versions", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(rss_probe(args.probe, args.versions, bool(args.shared), 50)))
        return 0
    target = IndexConfig.from_env().min_recall
    workdir = Path(tempfile.mkdtemp(prefix="ragpipe-segments-", dir=args.workdir))
    try:
        result = run(workdir, args, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


def run(workdir: Path, args: argparse.Namespace, target: float) -> dict[str, Any]:
    corpus = Corpus(workdir, args.chunks, args.dim)
    result: dict[str, Any] = {
        "benchmark": "segments", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "chunks": args.chunks, "dim": args.dim, "min_recall": target,
        "embed_seconds_untimed": round(corpus.embed_seconds, 1), "layouts": {},
    }
    versions: dict[str, tuple[SegmentStore, VersionManifest]] = {}
    for label, parts in [("one", 1), ("many", args.segments)]:
        store = SegmentStore(workdir / label)
        built = build_layout(store, corpus, parts, target)
        base = version(corpus, "base", built.pop("refs"))
        store.write_version(base)
        pool = SegmentPool(store)
        changed, delta = change(store, corpus, pool, base, "changed", args.change, target)
        built["change"] = delta
        built["whole_copy_bytes"] = built["bytes"]  # what a whole-copy version writes for the same change
        result["layouts"][f"{label}_{parts}"] = built
        versions[label] = (store, changed)
    qtexts = query_texts(500_000_000, args.queries)
    qvectors = corpus.embedder.embed(qtexts)
    queries: dict[str, Any] = {}
    for label, (store, manifest) in versions.items():
        for vname in ("base", "changed"):
            v = SegmentedVersion(store.read_version(vname), SegmentPool(store, verify=False))
            key = f"{label}/{vname} ({len(v.parts)} segments, {v.manifest.deleted} deleted)"
            entry = {"measured_ef": time_queries(v, qtexts, qvectors), "recall_at_10": recall(v, qvectors),
                     "ef_100": time_queries(v, qtexts, qvectors, ef=100), "recall_at_10_ef_100": recall(v, qvectors, 100)}
            if v.manifest.deleted:
                entry["overfetch"] = time_queries(v, qtexts, qvectors, deletions="overfetch")
                entry["recall_at_10_overfetch"] = recall(v, qvectors, deletions="overfetch")
            queries[key] = entry
    result["queries"] = queries
    result["deletion_modes"] = deletion_modes(versions["many"][0], qvectors)
    many = versions["many"][0].root
    one = versions["one"][0].root
    result["memory"] = {
        "many: one version (changed)": _probe(many, ["changed"], True),
        "many: two adjacent versions, shared segments": _probe(many, ["base", "changed"], True),
        "many: two versions loaded separately (as whole copies)": _probe(many, ["base", "changed"], False),
        "one: one version (changed)": _probe(one, ["changed"], True),
        "one: two adjacent versions, shared segments": _probe(one, ["base", "changed"], True),
    }
    return result


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: how the pipeline's costs grow from 10k to 1M chunks on one machine.

For each size, a corpus of real text is written to a directory: the PEPs in their final state
(reStructuredText with their real structure), replicated and perturbed — every replica replaces about
one prose word in twelve with a word drawn from the corpus's vocabulary, so that no two replicas share
their prose chunks and each replica is embedded on its own. Then, each phase in a process of its own
(so that its peak memory is its own):

- ``build``: the initial full run (chunking, deterministic embedding, HNSW, BM25, validation, publish);
- ``noop``: the same source again — hashing every file, diffing against the registry, no version;
- ``change``: 1% of the documents re-perturbed, one incremental run; the figure that counts is the
  run's time excluding embedding (the deterministic embedder is nearly free, a real model is not);
  then the compaction a DAG runs after a publish when the merge policy asks (``change.compact``);
- ``query``: the query path at that size (see :func:`benchmarks.query.measure`), plus HNSW
  recall@10 against exact search at the served ef, and serving memory with one version loaded and
  with the two adjacent ones (the change's and the compacted one, else the build's and the
  change's) held at once;
- ``upsert``: single-document upserts, each timed from the call until a retriever following the
  alias serves the document;
- ``compact``: the merge policy applied to the segments the upserts left.

Reported per size: chunks, documents, seconds and peak RSS of each phase, the version's artifact
bytes and what the 1% change added to them, the registry database's bytes, query p50/p95 and
throughput, upsert-to-searchable p50/p95, compaction seconds and segment counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import phase_arguments, ran_phase

_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+:.])\1{2,}\s*$", re.M)
SEED = 20261127


def templates(shared: Path) -> list[tuple[str, str]]:
    """(file name, text) of every PEP in its final state, in a stable order."""
    from benchmarks.noop import peps_final

    docs = peps_final(shared)
    return [(Path(doc_id).name, text) for doc_id, (text, _) in sorted(docs.items())]


def vocabulary(texts: list[str]) -> list[str]:
    words = {w for text in texts for w in re.findall(r"[A-Za-z]{3,14}", text)}
    return sorted(words)


def perturb(text: str, rng: random.Random, vocab: list[str], rate: float = 1 / 12) -> str:
    """Replace about ``rate`` of the words of every prose paragraph; headings, code and markup stay."""
    paragraphs = text.split("\n\n")
    for j, paragraph in enumerate(paragraphs):
        if not paragraph[:1].isalpha() or _UNDERLINE.search(paragraph):
            continue
        words = paragraph.split(" ")
        spots = [i for i, w in enumerate(words) if w.isalpha()]
        if not spots:
            continue
        for i in rng.sample(spots, max(1, int(len(spots) * rate))):
            words[i] = rng.choice(vocab)
        paragraphs[j] = " ".join(words)
    return "\n\n".join(paragraphs)


def chunk_counts(items: list[tuple[str, str]]) -> list[int]:
    """How many chunks each template makes with the default chunker and model tokenizer."""
    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.chunking import chunk_document
    from pipeline.sources import scan_records

    embedder = DeterministicEmbedder()
    counter = embedder.token_counter()
    scan = scan_records(((name, text, {}) for name, text in items), "scale")
    by_name = {d.doc_id: len(chunk_document(d, counter, embedder.max_tokens)) for d in scan.documents}
    return [by_name.get(name, 0) for name, _ in items]


def doc_path(root: Path, i: int, name: str) -> Path:
    return root / f"r{i // 1000:04d}" / f"{i:07d}-{name}"


def write_corpus(root: Path, items: list[tuple[str, str]], counts: list[int], target: int,
                 vocab: list[str]) -> list[int]:
    """Write replicas until the expected chunk count reaches ``target``; return each document's template."""
    chosen: list[int] = []
    expected = 0
    order = random.Random(SEED)
    while expected < target:
        t = order.randrange(len(items))
        if counts[t] == 0:
            continue
        i = len(chosen)
        path = doc_path(root, i, items[t][0])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(perturb(items[t][1], random.Random(SEED * 1_000_003 + i), vocab), encoding="utf-8")
        chosen.append(t)
        expected += counts[t]
    return chosen


def change_corpus(root: Path, items: list[tuple[str, str]], chosen: list[int], vocab: list[str],
                  fraction: float) -> int:
    """Re-perturb ``fraction`` of the documents with another seed; return how many changed."""
    picked = random.Random(SEED + 1).sample(range(len(chosen)), max(1, int(len(chosen) * fraction)))
    for i in picked:
        name, text = items[chosen[i]]
        doc_path(root, i, name).write_text(perturb(text, random.Random(SEED * 7_000_003 + i), vocab), encoding="utf-8")
    return len(picked)


# -- phases (each runs in a child process) -------------------------------------------------------

def _config(artifacts: str, min_recall: float) -> Any:
    from pipeline.config import IndexConfig

    # the deterministic embedder's hashed vectors are a hard case for HNSW (see docs/benchmarks.md):
    # the gate is lowered and the recall each version reached is reported instead
    return IndexConfig(index="scale", artifacts=artifacts, lock_timeout=0, min_recall=min_recall, retention=2)


def phase_run(root: str, url: str, home: str, artifacts: str, min_recall: float) -> dict[str, Any]:
    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.runner import run_index
    from registry import Registry, RegistryConfig

    embedder = DeterministicEmbedder()
    with Registry.open(RegistryConfig(database_url=url, home=Path(home))) as registry:
        started = time.perf_counter()
        summary = run_index(root, registry, embedder, _config(artifacts, min_recall))
        wall = time.perf_counter() - started
        size = registry.database_bytes()
    stages = summary.stage_seconds
    return {"wall_seconds": round(wall, 2), "excluding_embedding_seconds": round(wall - stages.get("embed", 0.0), 2),
            "stage_seconds": stages, "version": summary.version, "chunks": summary.chunks,
            "documents": summary.documents, "embedding": summary.embedding, "registry_bytes": int(size)}


def phase_query(url: str, home: str, shared: str, ef: int, previous: str | None = None) -> dict[str, Any]:
    from benchmarks.query import measure

    return measure(Path(shared), url, home, "scale", ef=ef or None, also_hold=previous)


def phase_upsert(url: str, home: str, artifacts: str, min_recall: float, count: int) -> dict[str, Any]:
    """``count`` single-document upserts, each timed from the call until a following retriever serves it."""
    import io
    import statistics

    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.upsert import upsert_documents
    from registry import Registry, RegistryConfig
    from retrieval import Retriever

    embedder = DeterministicEmbedder()
    config = _config(artifacts, min_recall)
    seconds = []
    with Registry.open(RegistryConfig(database_url=url, home=Path(home))) as registry, \
            Retriever.open("scale", url, home=home, encoder=embedder, poll_interval=0.1, result_cache_size=0) as r:
        for i in range(count):
            doc_id = f"upsert/{i:03d}"
            word = "zq" + "".join(chr(97 + (i // 26 ** j) % 26) for j in range(4))  # a term no other chunk holds
            line = json.dumps({"doc_id": doc_id, "text": f"Upserted page {i}: the {word} carried gas cells."})
            started = time.perf_counter()
            upsert_documents(io.BytesIO((line + "\n").encode()), registry, embedder, config)
            query = f"{word} upserted page {i}"
            while not any(h.doc_id == doc_id for h in r.search(query, k=10)):
                if time.perf_counter() - started > 60:
                    raise RuntimeError(f"{doc_id} not served within 60 s: the retriever serves {r.version}, the "
                                       f"alias names {registry.list_aliases()[0].version}; refused: {r.refused}; "
                                       f"hits {[h.doc_id for h in r.search(query, k=10)]}")
                time.sleep(0.01)
            seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    return {"count": count, "searchable_seconds_p50": round(statistics.median(ordered), 3),
            "searchable_seconds_p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
            "searchable_seconds_max": round(ordered[-1], 3)}


def phase_compact(url: str, home: str, artifacts: str, min_recall: float) -> dict[str, Any]:
    from pipeline.compaction import compact_index
    from registry import Registry, RegistryConfig

    with Registry.open(RegistryConfig(database_url=url, home=Path(home))) as registry:
        report = compact_index(registry, _config(artifacts, min_recall))
    return {"seconds": report.seconds, "segments_before": report.segments_before,
            "segments_after": report.segments_after, "status": report.status, "merges": len(report.merges)}


PHASES = {"run": phase_run, "query": phase_query, "upsert": phase_upsert, "compact": phase_compact}


def in_child(phase: str, **kwargs: Any) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; add its peak RSS."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "scale", "--phase", phase, "--args", json.dumps(kwargs)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": f"exit code {proc.returncode}"}
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    print(json.dumps({"phase": phase, **result}), file=sys.stderr, flush=True)  # progress, phase by phase
    return result


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def version_files(index_dir: Path, version: str) -> dict[str, int]:
    """Bytes of every file a version reads, by path under the index's directory: its manifest and,
    for a segmented version, its segments and deletion sets."""
    manifest_path = index_dir / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    out = {str(p.relative_to(index_dir)): p.stat().st_size for p in (index_dir / version).rglob("*") if p.is_file()}
    for ref in manifest.get("segments", []):
        for p in (index_dir / "segments" / ref["name"]).iterdir():
            out[f"segments/{ref['name']}/{p.name}"] = p.stat().st_size
        if ref.get("deletions"):
            out[f"deletions/{ref['deletions']}"] = (index_dir / "deletions" / ref["deletions"]).stat().st_size
    return out


@contextmanager
def _workspace(workdir: Path | None, keep: bool) -> Iterator[str]:
    """A directory for one size's corpus, home and artifacts: removed afterwards unless ``keep``."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix="ragpipe-scale-", dir=workdir) as tmp:
            yield tmp
        return
    tmp = tempfile.mkdtemp(prefix="ragpipe-scale-", dir=workdir)
    yield tmp
    print(json.dumps({"kept": tmp}), file=sys.stderr, flush=True)


def run(shared: Path, sizes: list[int], fraction: float, min_recall: float, ef: int,
        workdir: Path | None, upserts: int = 20, keep: bool = False) -> dict[str, Any]:
    from registry import RegistryConfig
    from registry.db import scratch_database

    registry_config = RegistryConfig.from_env()
    items = templates(shared)
    started = time.perf_counter()
    counts = chunk_counts(items)
    vocab = vocabulary([t for _, t in items])
    out: dict[str, Any] = {
        "benchmark": "scale", "templates": len(items), "template_chunks": sum(counts),
        "calibration_seconds": round(time.perf_counter() - started, 1), "changed_fraction": fraction, "sizes": [],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB",
        "python": sys.version.split()[0], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    for size in sizes:
        with _workspace(workdir, keep) as tmp, \
                scratch_database(registry_config.database_url, registry_config.home, keep=keep) as url:
            if keep:
                print(json.dumps({"kept_database": url}), file=sys.stderr, flush=True)
            root, artifacts = Path(tmp) / "source", Path(tmp) / "artifacts"
            root.mkdir()
            started = time.perf_counter()
            chosen = write_corpus(root, items, counts, size, vocab)
            entry: dict[str, Any] = {"target_chunks": size, "documents": len(chosen),
                                     "source_bytes": directory_bytes(root),
                                     "corpus_write_seconds": round(time.perf_counter() - started, 1)}
            common = {"root": str(root), "url": url, "home": tmp, "artifacts": str(artifacts), "min_recall": min_recall}
            out["sizes"].append(entry)
            entry["build"] = in_child("run", **common)
            if "error" in entry["build"]:
                continue
            entry["chunks"] = entry["build"]["chunks"]["active"]
            index_dir = artifacts / "scale"
            built = version_files(index_dir, entry["build"]["version"])
            entry["artifact_bytes"] = sum(built.values())
            entry["noop"] = in_child("run", **common)
            entry["changed_documents"] = change_corpus(root, items, chosen, vocab, fraction)
            entry["change"] = in_child("run", **common)
            if "error" in entry["change"]:
                continue
            changed = version_files(index_dir, entry["change"]["version"])
            # what the 1% change version added to the artifact store: the files its parent did not have
            entry["change"]["artifact_bytes_added"] = sum(n for path, n in changed.items() if path not in built)
            entry["change"]["artifact_bytes"] = sum(changed.values())
            # what the DAG does after a publish: compaction when the policy asks (here: give the change's
            # segment, published without a graph, its graph), so that queries meet the steady state
            entry["change"]["compact"] = in_child("compact", url=url, home=tmp, artifacts=str(artifacts),
                                                  min_recall=min_recall)
            previous = entry["change"]["version"] if entry["change"]["compact"].get("status") == "published" \
                else entry["build"]["version"]
            entry["query"] = in_child("query", url=url, home=tmp, shared=str(shared), ef=ef, previous=previous)
            entry["upsert"] = in_child("upsert", url=url, home=tmp, artifacts=str(artifacts), min_recall=min_recall,
                                       count=upserts)
            entry["compact"] = in_child("compact", url=url, home=tmp, artifacts=str(artifacts), min_recall=min_recall)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="target chunk counts, comma-separated")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of documents changed")
    parser.add_argument("--ef", type=int, default=0,
                        help="HNSW search breadth served and measured (0: the breadth each segment recorded)")
    parser.add_argument("--upserts", type=int, default=20, help="single-document upserts timed until searchable")
    parser.add_argument("--min-recall", type=float, default=0.8, help="validation gate for the synthetic vectors")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora and versions are written")
    parser.add_argument("--shared-data", type=Path, default=None)
    parser.add_argument("--keep", action="store_true",
                        help="leave each size's directory and scratch database in place (their names go to stderr)")
    phase_arguments(parser, PHASES)
    args = parser.parse_args(argv)
    if ran_phase(args, PHASES):
        return 0
    from benchmarks import shared_data_dir

    sizes = [int(s) for s in args.sizes.split(",")]
    print(json.dumps(run(shared_data_dir(args.shared_data), sizes, args.changed, args.min_recall, args.ef,
                         args.workdir, args.upserts, args.keep), indent=2))
    return 0

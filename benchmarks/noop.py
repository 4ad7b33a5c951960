"""No-op run benchmark: how long an indexing pass takes when nothing changed.

Two corpora, both written to a directory so the pass reads and hashes real files:

- ``peps``: the final state of the PEPs replay (base plus every change), about 720 documents;
- ``tldr``: 100,000 small documents (3 to 8 sentences each) drawn from the real sentences of the
  Cranfield abstracts and the PEPs, deterministically.

The index is built once in a scratch database with the deterministic embedder, then the no-op pass
runs ``--repeat`` times; the JSON reports each pass's pipeline seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.deterministic import DeterministicEmbedder
from pipeline.config import IndexConfig
from pipeline.replay import load_replay
from pipeline.runner import run_index
from registry import Registry, RegistryConfig
from registry.db import scratch_database


def peps_final(shared: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """The PEPs replay's documents after its last step."""
    docs, steps = load_replay(shared / "peps-replay")
    for records in steps.values():
        for change in records:
            if change["op"] == "delete":
                docs.pop(change["doc_id"], None)
            else:
                docs[change["doc_id"]] = (change["text"], {})
    return docs


def write_peps_final(shared: Path, out: Path) -> int:
    docs = peps_final(shared)
    for doc_id, (text, _) in docs.items():
        path = out / doc_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return len(docs)


def _sentences(shared: Path) -> list[str]:
    found: list[str] = []
    with open(shared / "cranfield" / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            found.extend(re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]))
    docs, _ = load_replay(shared / "peps-replay")
    for text, _ in docs.values():
        for para in text.split("\n\n"):
            if para[:1].isalpha():
                found.extend(re.split(r"(?<=[.!?])\s+", " ".join(para.split())))
    return [s for s in found if 30 <= len(s) <= 300]


def write_tldr(shared: Path, out: Path, count: int) -> int:
    sentences = _sentences(shared)
    rng = random.Random(20261126)
    for i in range(count):
        path = out / f"{i // 1000:03d}" / f"page-{i:06d}.md"
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        body = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8)))
        path.write_text(f"# page {i}\n\n{body}\n", encoding="utf-8")
    return count


def run(corpus: str, shared: Path, count: int, repeat: int, registry_config: RegistryConfig) -> dict[str, Any]:
    embedder = DeterministicEmbedder()
    with tempfile.TemporaryDirectory(prefix="ragpipe-noop-") as tmp:
        root = Path(tmp) / "source"
        root.mkdir()
        # the synthetic corpus's hashed vectors are nearly equidistant, a hard case for HNSW (see
        # docs/benchmarks.md); this benchmark measures the no-op pass, so the gate is lowered
        config = IndexConfig(index="bench", lock_timeout=0, artifacts=str(Path(tmp) / "artifacts"), min_recall=0.85)
        started = time.perf_counter()
        documents = write_peps_final(shared, root) if corpus == "peps" else write_tldr(shared, root, count)
        write_seconds = time.perf_counter() - started
        with scratch_database(registry_config.database_url, registry_config.home) as url:
            with Registry.open(RegistryConfig(database_url=url, home=registry_config.home)) as registry:
                started = time.perf_counter()
                build = run_index(str(root), registry, embedder, config)
                build_seconds = time.perf_counter() - started
                passes = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    summary = run_index(str(root), registry, embedder, config)
                    wall = time.perf_counter() - started
                    assert summary.version is None, "the no-op pass found changes"
                    passes.append({"wall_seconds": round(wall, 4), "stage_seconds": summary.stage_seconds})
    walls = [p["wall_seconds"] for p in passes]
    return {
        "benchmark": "noop",
        "corpus": corpus,
        "documents": documents,
        "chunks": build.chunks["active"],
        "initial_build_seconds": round(build_seconds, 2),
        "corpus_write_seconds": round(write_seconds, 2),
        "noop_wall_seconds_median": round(statistics.median(walls), 4),
        "noop_wall_seconds_max": round(max(walls), 4),
        "passes": passes,
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus".strip(),
        "python": sys.version.split()[0],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks noop", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=["peps", "tldr"], default="peps")
    parser.add_argument("--documents", type=int, default=100_000, help="tldr corpus size")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shared-data", type=Path, default=None, help="default: RAGPIPE_SHARED_DATA or ../shared/data")
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    result = run(args.corpus, shared_data_dir(args.shared_data), args.documents, args.repeat, RegistryConfig.from_env())
    print(json.dumps(result, indent=2))
    return 0

"""Remote retriever benchmark: how long a retriever on a machine that never built anything takes to
serve a version whose artifacts live in an object store.

An index of ``--chunks`` chunks (the scale benchmark's corpus: the PEPs replicated and perturbed,
deterministic embedder) is built with its artifacts on S3 — moto's server on a loopback port,
started here — and then, each in a process of its own with a fresh home:

- ``cold``: ``Retriever.open`` until the first search answers; every segment is downloaded into
  the segment cache, checked against its checksums, and opened;
- ``warm``: the same home again (a restarted process): the segments are in the cache, nothing is
  downloaded;
- ``change``: after a 1% change (one incremental run), a retriever of the cold home switches to the
  new version: what it downloads (the new segment and deletion sets) and how long the switch takes.

Reported: ready seconds, bytes and segments downloaded, the artifact store's bytes, build seconds.
Loopback S3 through moto is slower per byte than a real object store in the same region and has
no network latency; the figures show what the retriever does with the bytes, not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import phase_arguments, ran_phase

BUCKET = "ragpipe-bench"
QUERY = "the garbage collector frees reference cycles"


def phase_ready(url: str, home: str) -> dict[str, Any]:
    """Open a retriever in ``home`` and search once; time both, and what the cache downloaded."""
    from pipeline.deterministic import DeterministicEmbedder
    from retrieval import Retriever

    embedder = DeterministicEmbedder()
    started = time.perf_counter()
    with Retriever.open("scale", url, home=home, encoder=embedder, follow=False, stats_interval=0) as r:
        opened = time.perf_counter() - started
        hits = r.search(QUERY, k=10)
        ready = time.perf_counter() - started
        fetched = r.segment_cache.fetched
        return {"ready_seconds": round(ready, 2), "open_seconds": round(opened, 2), "version": r.version,
                "chunks": r._current.size, "segments": len(r._current.segment_names),
                "segments_downloaded": len(fetched.segments), "deletion_sets_downloaded": len(fetched.deletions),
                "bytes_downloaded": fetched.bytes, "download_seconds": round(fetched.seconds, 2),
                "hits": len(hits)}


def phase_switch(url: str, home: str, root: str, artifacts: str, min_recall: float, changed: float) -> dict[str, Any]:
    """Serve the current version from ``home``, publish a change of ``changed`` of the documents,
    and time the retriever's switch to it."""
    from benchmarks.scale import _config, change_corpus, templates, vocabulary
    from benchmarks import shared_data_dir
    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.runner import run_index
    from registry import Registry, RegistryConfig
    from retrieval import Retriever

    embedder = DeterministicEmbedder()
    items = templates(shared_data_dir())
    chosen = json.loads((Path(root) / "chosen.json").read_text())
    count = change_corpus(Path(root) / "source", items, chosen, vocabulary([t for _, t in items]), changed)
    with Retriever.open("scale", url, home=home, encoder=embedder, follow=False, stats_interval=0) as r:
        before = r.segment_cache.fetched
        build_home = str(Path(root) / "builder")
        with Registry.open(RegistryConfig(database_url=url, home=Path(build_home))) as registry:
            started = time.perf_counter()
            summary = run_index(str(Path(root) / "source"), registry, embedder, _config(artifacts, min_recall))
            run_seconds = time.perf_counter() - started
        started = time.perf_counter()
        switched = r.refresh()
        seconds = time.perf_counter() - started
        after = r.segment_cache.fetched
        return {"changed_documents": count, "run_seconds": round(run_seconds, 2), "switched": switched,
                "version": summary.version, "switch_seconds": round(seconds, 2),
                "segments": len(r._current.segment_names),
                "segments_downloaded": len(after.segments) - len(before.segments),
                "deletion_sets_downloaded": len(after.deletions) - len(before.deletions),
                "bytes_downloaded": after.bytes - before.bytes,
                "download_seconds": round(after.seconds - before.seconds, 2)}


def phase_build(url: str, root: str, artifacts: str, min_recall: float, chunks: int) -> dict[str, Any]:
    from benchmarks import shared_data_dir
    from benchmarks.scale import chunk_counts, phase_run, templates, vocabulary, write_corpus

    items = templates(shared_data_dir())
    source = Path(root) / "source"
    source.mkdir(parents=True)
    chosen = write_corpus(source, items, chunk_counts(items), chunks, vocabulary([t for _, t in items]))
    (Path(root) / "chosen.json").write_text(json.dumps(chosen))
    return {"documents": len(chosen), **phase_run(str(source), url, str(Path(root) / "builder"), artifacts, min_recall)}


PHASES = {"build": phase_build, "ready": phase_ready, "switch": phase_switch}


def in_child(phase: str, **kwargs: Any) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; add its wall time from start to exit (imports included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "remote", "--phase", phase, "--args", json.dumps(kwargs)],
                          stdout=subprocess.PIPE, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
        {"error": f"exit code {proc.returncode}"}
    result["process_wall_seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps({"phase": phase, **result}), file=sys.stderr, flush=True)
    return result


def store_bytes(endpoint: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="artifacts/")
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def run(chunks: int, changed: float, min_recall: float, keep: Path | None) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    from registry import RegistryConfig
    from registry.db import scratch_database

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_REGION": "us-east-1"}.items():
        os.environ[name] = value
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    registry_config = RegistryConfig.from_env()
    out: dict[str, Any] = {
        "benchmark": "remote", "target_chunks": chunks, "object_store": "moto server on loopback",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB",
        "python": sys.version.split()[0], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="ragpipe-remote-", dir=keep) as tmp, \
                scratch_database(registry_config.database_url, registry_config.home) as url:
            artifacts = f"s3://{BUCKET}/artifacts"
            out["build"] = in_child("build", url=url, root=tmp, artifacts=artifacts, min_recall=min_recall, chunks=chunks)
            if "error" in out["build"]:
                return out
            out["chunks"] = out["build"]["chunks"]["active"]
            out["artifact_store_bytes"] = store_bytes(endpoint)
            home = str(Path(tmp) / "reader")
            out["cold"] = in_child("ready", url=url, home=home)
            out["warm"] = in_child("ready", url=url, home=home)
            out["change"] = in_child("switch", url=url, home=home, root=tmp, artifacts=artifacts,
                                     min_recall=min_recall, changed=changed)
    finally:
        server.stop()
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks remote", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000, help="target chunk count of the index")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of documents the change re-perturbs")
    parser.add_argument("--min-recall", type=float, default=0.8, help="validation gate for the synthetic vectors")
    parser.add_argument("--workdir", type=Path, default=None, help="where the corpus and homes are written")
    phase_arguments(parser, PHASES)
    args = parser.parse_args(argv)
    if ran_phase(args, PHASES):
        return 0
    print(json.dumps(run(args.chunks, args.changed, args.min_recall, args.workdir), indent=2))
    return 0

"""Checksum benchmark: what verifying a version's SHA-256 checksums adds to loading it for serving.

Builds a version of N one-chunk documents of real sentences (the deterministic embedder, as the
query benchmark does), one segment, then times, alternating R rounds: opening the segment without
checksum verification, opening it with verification (its files hashed in parallel threads first),
and hashing its files alone, one after another and in parallel. ``--synthetic-gb`` also hashes that many bytes
of random data spread over files of the version's proportions, for sizes too large to build here.
The files are in the page cache after the first round (a freshly downloaded or just-built version
is too); the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.deterministic import DeterministicEmbedder
from benchmarks.noop import _sentences
from benchmarks.publish import make_docs
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store, run_index
from pipeline.sources import scan_records
from registry import Registry, RegistryConfig
from registry.db import scratch_database
from retrieval.artifacts import file_problems, sha256_file
from pipeline.segments.storage import SegmentArtifacts
from retrieval.segments.files import read_segment_manifest
from retrieval.segments.segment import Segment


def _median_seconds(runs: list[float]) -> float:
    return round(statistics.median(runs), 3)


def measure_files(directory: Path, files: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Hashing the files one after another and in parallel (``file_problems``)."""
    sequential, parallel = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for name in files:
            sha256_file(directory / name)
        sequential.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert not file_problems(directory, files)
        parallel.append(time.perf_counter() - started)
    total = sum(int(f["bytes"]) for f in files.values())
    seq, par = statistics.median(sequential), statistics.median(parallel)
    return {"bytes": total, "files": {name: int(f["bytes"]) for name, f in files.items()},
            "sha256_sequential_seconds": round(seq, 3), "sha256_sequential_gb_per_s": round(total / seq / 1e9, 2),
            "sha256_parallel_seconds": round(par, 3), "sha256_parallel_gb_per_s": round(total / par / 1e9, 2)}


def measure_version(directory: Path, rounds: int) -> dict[str, Any]:
    """Opening one segment (``directory``) for serving without and with its checksums verified."""
    files = read_segment_manifest(directory).file_table()
    Segment(directory, verify=False)  # warm the page cache
    plain, verified = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        Segment(directory, verify=False)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        Segment(directory)
        verified.append(time.perf_counter() - started)
    out = measure_files(directory, files, rounds)
    out.update({"load_without_checksums_seconds": _median_seconds(plain),
                "load_with_checksums_seconds": _median_seconds(verified),
                "checksum_overhead_seconds": round(statistics.median(verified) - statistics.median(plain), 3)})
    return out


def measure_synthetic(workdir: Path, gigabytes: float, proportions: dict[str, int], rounds: int) -> dict[str, Any]:
    """Hash ``gigabytes`` of random bytes in files sized like the version's."""
    total = int(gigabytes * 1e9)
    scale = total / sum(proportions.values())
    files: dict[str, Any] = {}
    block = os.urandom(1 << 24)
    for name, size in proportions.items():
        want = int(size * scale)
        with open(workdir / name, "wb") as fh:
            for start in range(0, want, len(block)):
                fh.write(block[: min(len(block), want - start)])
        files[name] = {"bytes": want, "sha256": sha256_file(workdir / name)}
    return measure_files(workdir, files, rounds)


def run(shared: Path, size: int, registry_config: RegistryConfig, rounds: int, synthetic_gb: float | None) -> dict[str, Any]:
    docs = make_docs(_sentences(shared), size, seed=size)
    embedder = DeterministicEmbedder()
    out: dict[str, Any] = {"benchmark": "checksums", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                           "cpus": os.cpu_count(), "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="ragpipe-checksums-") as tmp, \
            scratch_database(registry_config.database_url, registry_config.home) as url:
        config = IndexConfig(index="bench", artifacts=str(Path(tmp) / "artifacts"), min_recall=0.0)
        with Registry.open(RegistryConfig(database_url=url, home=Path(tmp))) as registry:
            summary = run_index(scan_records(((d, t, {}) for d, t in docs.items()), "bench"), registry, embedder,
                                config)
            files = SegmentArtifacts(artifact_store(config, registry.home), "bench")
            assert summary.version is not None
            manifest = files.read_version(summary.version)
            assert manifest is not None and len(manifest.segments) == 1
            directory = files.segment_path(manifest.segments[0].name)
        out["chunks"] = size
        out["version"] = measure_version(directory, rounds)
        if synthetic_gb:
            synthetic = Path(tmp) / "synthetic"
            synthetic.mkdir()
            out["synthetic"] = measure_synthetic(synthetic, synthetic_gb, out["version"]["files"], rounds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks checksums", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthetic-gb", type=float, default=None,
                        help="also hash this many GB of random data in files of the version's proportions")
    parser.add_argument("--shared-data", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    result = run(shared_data_dir(args.shared_data), args.chunks, RegistryConfig.from_env(), args.rounds,
                 args.synthetic_gb)
    print(json.dumps(result, indent=2))
    return 0

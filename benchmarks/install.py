"""Install benchmark: the base install from the built wheel, and its cold start against a large index.

1. ``python -m build`` makes the sdist and the wheel; ``twine check --strict`` checks their metadata.
2. A fresh virtual environment (made without pip, so that only what ragpipe brings is counted) gets
   ``pip install WHEEL``: the base install. Reported: time, distributions, site-packages size, and
   whether torch or Airflow came along (they must not).
3. The full install (this interpreter) indexes N one-sentence documents (real sentences from the
   shared data) with the real default model, so the version stores its ONNX query encoder.
4. A cold start: a new process of each install opens a Retriever on that index and runs the same
   queries. Reported: seconds from process start to the first result, and whether every hit (chunk,
   rank and every stage's score) of the base install equals the full install's.

``python -m benchmarks install --chunks 100000`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import shared_data_dir

REPO = Path(__file__).resolve().parent.parent

QUERIES = ["boundary layer transition at supersonic speeds", "how does a PEP get accepted?",
           "heat transfer in hypersonic flow", "deprecating a standard library module"]

# Runs in the measured interpreter: import, open, search; prints timings and hits as one JSON line.
COLD_START = """
import json, sys, time
started = float(sys.argv[1])
from retrieval import Retriever
imported = time.time()
retriever = Retriever.open(sys.argv[2], follow=False)
opened = time.time()
results = [[h.to_dict() for h in retriever.search(q, k=10)] for q in json.loads(sys.argv[3])]
first = time.time()
heavy = sorted(m for m in ("torch", "transformers", "sentence_transformers", "airflow") if m in sys.modules)
print(json.dumps({"import_s": imported - started, "open_s": opened - imported, "searches_s": first - opened,
                  "to_first_results_s": first - started, "heavy_modules_loaded": heavy, "hits": results}))
"""


def clean_env() -> dict[str, str]:
    """This environment without what would let another interpreter see this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", clean_env())
    kwargs.setdefault("cwd", tempfile.gettempdir())
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def build_distribution(out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)], cwd=out)
    seconds = time.perf_counter() - started
    files = sorted(out.glob("ragpipe-*"))
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                           capture_output=True, text=True)
    return {"seconds": round(seconds, 1), "files": {f.name: f.stat().st_size for f in files},
            "twine_check": "passed" if check.returncode == 0 else check.stdout + check.stderr}


def base_install(wheel: Path, venv: Path) -> dict[str, Any]:
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    started = time.perf_counter()
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
          str(wheel)])
    seconds = time.perf_counter() - started
    listing = _run([str(python), "-c", "import importlib.metadata as m, json, site; print(json.dumps("
                    "{'dists': sorted(d.metadata['Name'] for d in m.distributions()), 'site': site.getsitepackages()}))"])
    info = json.loads(listing.stdout)
    site = Path(info["site"][0])
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
    dists = info["dists"]
    lowered = {d.lower() for d in dists}
    return {"seconds": round(seconds, 1), "distributions": len(dists), "site_packages_mb": round(size / 2**20, 1),
            "torch": "torch" in lowered, "airflow": any(d.startswith("apache-airflow") for d in lowered),
            "names": dists}


def build_index(shared: Path, url: str, home: Path, count: int) -> dict[str, Any]:
    from benchmarks.noop import _sentences
    from pipeline.config import IndexConfig
    from pipeline.embedding import DEFAULT_MODEL, make_embedder
    from pipeline.runner import run_index
    from pipeline.sources import scan_records
    from registry import Registry, RegistryConfig

    sentences = _sentences(shared)
    records = [(f"s-{i:07d}", sentences[i % len(sentences)], {}) for i in range(count)]
    config = RegistryConfig(database_url=url, home=home)
    started = time.perf_counter()
    with Registry.open(config) as registry:
        embedder = make_embedder(DEFAULT_MODEL, device="cpu", cache_dir=home / "cache", batch_size=64)
        summary = run_index(scan_records(records, "bench"), registry, embedder,
                            IndexConfig(index="big", artifacts=str(home / "artifacts"), batch_size=512))
        manifest = registry.get_version(summary.version).manifest
    return {"seconds": round(time.perf_counter() - started, 1), "chunks": manifest["counts"]["chunks"],
            "embedding": summary.embedding,
            "version": summary.version, "encoder_digest": manifest["model"]["encoder"]["digest"]}


def cold_start(python: Path, url: str, home: Path, *, checkout: bool = False) -> dict[str, Any]:
    """One new process of ``python`` from start to its first results (``checkout``: with this
    checkout first on its path, as the full install runs it)."""
    env = clean_env()
    if checkout:
        env["PYTHONPATH"] = str(REPO)
    env.update(RAGPIPE_DATABASE_URL=url, RAGPIPE_HOME=str(home), HF_HUB_OFFLINE="1")
    started = time.time()
    done = _run([str(python), "-c", COLD_START, repr(started), "big", json.dumps(QUERIES)], env=env)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.time() - started
    return out


def same_hits(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> bool:
    for hits_a, hits_b in zip(a, b, strict=True):
        if [h["chunk_id"] for h in hits_a] != [h["chunk_id"] for h in hits_b]:
            return False
        for x, y in zip(hits_a, hits_b):
            for stage in ("bm25", "vector", "fused", "rerank"):
                sx, sy = x[stage]["score"], y[stage]["score"]
                if x[stage]["rank"] != y[stage]["rank"] or (sx is None) != (sy is None) or (
                        sx is not None and abs(sx - sy) > 1e-6):
                    return False
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks install")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--shared-data", type=Path)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--rounds", type=int, default=2, help="cold starts per install, alternated")
    args = parser.parse_args(argv)
    from registry.db import scratch_database

    shared = shared_data_dir(args.shared_data)
    with tempfile.TemporaryDirectory(prefix="ragpipe-install-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "dist").mkdir(exist_ok=True)
        result: dict[str, Any] = {"benchmark": "install", "chunks_requested": args.chunks}
        result["distribution"] = build_distribution(work / "dist")
        wheel = next((work / "dist").glob("ragpipe-*.whl"))
        result["base_install"] = base_install(wheel, work / "base-venv")
        home = work / "home"
        with scratch_database(os.environ.get("RAGPIPE_DATABASE_URL"), home) as url:
            result["index"] = build_index(shared, url, home, args.chunks)
            rounds: dict[str, list[dict[str, Any]]] = {"base": [], "full": []}
            for _ in range(args.rounds):
                rounds["base"].append(cold_start(work / "base-venv" / "bin" / "python", url, work / "base-home"))
                rounds["full"].append(cold_start(Path(sys.executable), url, home, checkout=True))
        hits = {name: runs[0].pop("hits") for name, runs in rounds.items()}
        for runs in rounds.values():
            for run in runs[1:]:
                run.pop("hits")
        result["cold_start"] = {name: [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()}
                                       for run in runs] for name, runs in rounds.items()}
        result["hits_equal_to_full_install"] = same_hits(hits["base"], hits["full"])
    print(json.dumps(result, indent=2))
    return 0

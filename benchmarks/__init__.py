"""Benchmarks (`python -m benchmarks NAME`) and the helpers they need; nothing in the product imports them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = {
    "noop": "benchmarks.noop", "publish": "benchmarks.publish", "query": "benchmarks.query",
    "embed": "benchmarks.embed", "scale": "benchmarks.scale", "replay": "benchmarks.replay",
    "install": "benchmarks.install", "html": "benchmarks.html", "extraction": "benchmarks.extraction",
    "checksums": "benchmarks.checksums", "agent_cache": "benchmarks.agent_cache",
    "segments": "benchmarks.segments", "remote": "benchmarks.remote",
    "serve": "benchmarks.serve",
    "stability": "benchmarks.stability", "evalsets": "benchmarks.evalsets", "cluster": "benchmarks.cluster",
}


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run the benchmark ``name`` with its own command-line arguments; it prints one JSON result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = __import__(BENCHMARKS[name], fromlist=["main"])
    return int(module.main(argv))


def phase_arguments(parser: Any, phases: dict[str, Any]) -> None:
    """The hidden options by which a benchmark runs one of its phases in a child process."""
    import argparse

    parser.add_argument("--phase", choices=sorted(phases), help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)


def ran_phase(args: Any, phases: dict[str, Any]) -> bool:
    """Run the phase ``--phase`` names, printing its JSON result; False when none is named."""
    import json

    if not args.phase:
        return False
    print(json.dumps(phases[args.phase](**json.loads(args.args))))
    return True


def shared_data_dir(given: Path | None = None) -> Path:
    """The shared reference data: the given path, RAGPIPE_SHARED_DATA, else ../shared/data."""
    path = given or Path(os.environ.get("RAGPIPE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        sys.exit(f"shared reference data not found at {path}; pass --shared-data or set RAGPIPE_SHARED_DATA")
    return path

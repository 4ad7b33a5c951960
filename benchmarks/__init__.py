"""Benchmarks and the helpers they need; never imported by product defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def shared_data_dir(given: Path | None = None) -> Path:
    """The shared reference data: the given path, RAGPIPE_SHARED_DATA, else ../shared/data."""
    path = given or Path(os.environ.get("RAGPIPE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        sys.exit(f"shared reference data not found at {path}; pass --shared-data or set RAGPIPE_SHARED_DATA")
    return path

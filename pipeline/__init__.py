"""Indexing steps (sources, hashing, diff, chunking, embedding, apply) and the in-process runner."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path


def _version() -> str:
    try:
        return metadata.version("ragpipe")
    except metadata.PackageNotFoundError:  # a checkout on the path, not installed
        return "0+unknown"


__version__ = _version()


def dags_folder() -> Path:
    """The folder holding ragpipe's Airflow DAG files: ``pipeline/dags`` in an installed package
    (the build ships ``dags/`` there), else ``dags/`` of the checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "dags"
    return installed if (installed / "rag_index.py").is_file() else here.parent / "dags"

"""A version loaded for serving: its HNSW index, BM25 scorer and chunk table, read once per version."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.artifacts import CHUNK_SCHEMA, CHUNKS_FILE, MANIFEST, MATRIX_FILE, VECTORS_FILE
from retrieval.bm25 import ANALYZER_VERSION, Analyzer, BM25Scorer, BM25Tables
from retrieval.errors import VersionUnavailable
from retrieval.onnx import EncoderRef


@dataclass(frozen=True)
class VersionInfo:
    """What the registry says about the version an alias serves."""

    alias: str
    index: str
    version: str
    artifact_uri: str
    model_id: str
    updated_at: datetime | None


def local_directory(artifact_uri: str, cache_dir: Path) -> Path:
    """A local directory with the version's files: the URI itself, or a downloaded copy."""
    if "://" not in artifact_uri or artifact_uri.startswith("file://"):
        path = Path(artifact_uri.removeprefix("file://"))
        if not (path / MANIFEST).is_file():
            raise VersionUnavailable(f"version files missing at {artifact_uri}")
        return path
    from pyarrow import fs

    target = cache_dir / artifact_uri.replace("://", "/").replace(":", "_")
    if not (target / MANIFEST).is_file():
        filesystem, base = fs.FileSystem.from_uri(artifact_uri)
        partial = target.with_name(target.name + ".download")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            fs.copy_files(base, str(partial), source_filesystem=filesystem)
        except OSError as exc:
            raise VersionUnavailable(f"cannot download version files from {artifact_uri}: {exc}") from exc
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


class Column:
    """One column of a version's chunk table: Python values by row, from one contiguous Arrow array."""

    def __init__(self, values: pa.ChunkedArray) -> None:
        self._values = values.combine_chunks()

    def __getitem__(self, row: int) -> Any:
        return self._values[row].as_py()

    def __len__(self) -> int:
        return len(self._values)


class LoadedVersion:
    """Everything needed to answer queries from one version. Immutable once built; thread-safe reads."""

    def __init__(self, info: VersionInfo, directory: Path) -> None:
        import hnswlib

        self.info = info
        self.manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
        if self.manifest["model"]["id"] != info.model_id:
            raise VersionUnavailable(
                f"version {info.version}: manifest names model {self.manifest['model']['id']!r}, "
                f"the registry {info.model_id!r}"
            )
        if self.manifest["bm25"]["analyzer"] != ANALYZER_VERSION:
            raise VersionUnavailable(
                f"version {info.version} was analyzed with {self.manifest['bm25']['analyzer']!r}; this library "
                f"reads {ANALYZER_VERSION!r}: rebuild it with `ragpipe index SOURCE --full`"
            )
        self.dim = int(self.manifest["model"]["dim"])
        self.hnsw = hnswlib.Index(space=self.manifest["metric"], dim=self.dim)
        self.hnsw.load_index(str(directory / VECTORS_FILE))
        self.bm25 = BM25Scorer(BM25Tables.read(directory), Analyzer())
        self.bm25_row = {int(k): i for i, k in enumerate(self.bm25.keys.tolist())}
        chunks = pq.read_table(directory / CHUNKS_FILE, schema=CHUNK_SCHEMA)
        self.size = chunks.num_rows
        self.keys = chunks.column("chunk_key").to_numpy()
        self.row = {int(k): i for i, k in enumerate(self.keys.tolist())}
        self.matrix = np.load(directory / MATRIX_FILE, mmap_mode="r")
        # kept as Arrow arrays and read row by row for the few rows a query returns, rather than as
        # Python objects for every chunk (a str, int or list object per cell)
        self.columns = {name: Column(chunks.column(name)) for name in CHUNK_SCHEMA.names if name != "chunk_key"}
        self._metadata_cache: dict[int, dict[str, Any]] = {}
        self._last_valid_from = pc.max(chunks.column("valid_from")).as_py() if self.size else None

    @property
    def encoder_ref(self) -> EncoderRef | None:
        """The stored query encoder the manifest names (None for versions without one)."""
        data = self.manifest["model"].get("encoder")
        return EncoderRef.from_dict(data) if data else None

    @property
    def query_prefix(self) -> str:
        """What the version's model expects before every query (``model.query_prefix``)."""
        return str(self.manifest["model"].get("query_prefix", ""))

    def all_visible_by(self, now: datetime) -> bool:
        """Whether every chunk's valid_from has passed at ``now`` (results no longer depend on the clock)."""
        return self._last_valid_from is None or self._last_valid_from <= now

    def metadata(self, row: int) -> dict[str, Any]:
        cached = self._metadata_cache.get(row)
        if cached is None:
            cached = json.loads(self.columns["metadata"][row] or "{}")
            self._metadata_cache[row] = cached
        return cached

    def vectors(self, keys: list[int]) -> np.ndarray:
        """Full-precision vectors of chunks (the version's vector matrix, memory-mapped)."""
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.matrix[[self.row[k] for k in keys]], dtype=np.float32)

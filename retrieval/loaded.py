"""A version loaded for serving: its HNSW index, BM25 scorer and chunk table, read once per version.

Loading checks what the manifest promises: every file it lists exists with its size, and its SHA-256
(computed in background threads while the files are read) matches; a damaged version is refused with
a :class:`VersionCorrupt` naming the file, never served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.artifacts import (
    CHUNK_SCHEMA,
    CHUNKS_FILE,
    MANIFEST,
    MATRIX_FILE,
    VECTORS_FILE,
    download_directory,
    download_tree,
    file_problems,
    is_remote,
    read_manifest,
)
from retrieval.bm25 import ANALYZER_VERSION, POSTINGS_FILE, VOCAB_FILE, Analyzer, BM25Scorer, BM25Tables
from retrieval.errors import VersionCorrupt, VersionUnavailable
from retrieval.onnx import EncoderRef
from retrieval.vector import EfGate

logger = logging.getLogger("retrieval.retriever")  # the name the fall-back messages were always logged under
DEFAULT_EF = 100  # the search breadth of whole-copy versions, which record none


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
    if not is_remote(artifact_uri):
        path = Path(artifact_uri.removeprefix("file://"))
        if not (path / MANIFEST).is_file():
            raise VersionUnavailable(f"version files missing at {artifact_uri}")
        return path
    try:
        return download_tree(artifact_uri, download_directory(artifact_uri, cache_dir))
    except OSError as exc:
        raise VersionUnavailable(f"cannot download version files from {artifact_uri}: {exc}") from exc


class Column:
    """One column of a version's chunk table: Python values by row, from one contiguous Arrow array."""

    def __init__(self, values: pa.ChunkedArray) -> None:
        self._values = values.combine_chunks()

    def __getitem__(self, row: int) -> Any:
        return self._values[row].as_py()

    def __len__(self) -> int:
        return len(self._values)


class VersionReads:
    """What every loaded version answers the same way from its manifest's ``model`` record and its
    chunk columns (whole copies and segmented versions alike)."""

    manifest: dict[str, Any]
    columns: Any
    _metadata_cache: dict[int, dict[str, Any]]
    _last_valid_from: datetime | None

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

    def fields(self, row: int, names: Sequence[str]) -> dict[str, Any]:
        """The chunk-table values ``names`` of version row ``row`` (what a hit shows)."""
        return {name: self.columns[name][row] for name in names}

    def metadata(self, row: int) -> dict[str, Any]:
        cached = self._metadata_cache.get(row)
        if cached is None:
            cached = json.loads(self.columns["metadata"][row] or "{}")
            self._metadata_cache[row] = cached
        return cached


class LoadedVersion(VersionReads):
    """Everything needed to answer queries from one version. Immutable once built; thread-safe reads."""

    def __init__(self, info: VersionInfo, directory: Path, *, verify: bool = True) -> None:
        """Read the version in ``directory``.

        Args:
            verify: check the files' SHA-256 against the manifest (sizes are always checked).

        Raises:
            VersionCorrupt: a file is missing, truncated, unreadable or does not match its checksum;
                the message names the version and the file.
            VersionUnavailable: the version was made with another model or analyzer than it should.
        """
        self.info = info
        self.manifest: dict[str, Any] = read_manifest(directory, info.version)
        if self.manifest["model"].get("id") != info.model_id:
            raise VersionUnavailable(
                f"version {info.version}: manifest names model {self.manifest['model'].get('id')!r}, "
                f"the registry {info.model_id!r}"
            )
        if self.manifest["bm25"].get("analyzer") != ANALYZER_VERSION:
            raise VersionUnavailable(
                f"version {info.version} was analyzed with {self.manifest['bm25'].get('analyzer')!r}; this library "
                f"reads {ANALYZER_VERSION!r}: rebuild it with `ragpipe index SOURCE --full`"
            )
        files = self.manifest["files"]
        self._refuse(directory, file_problems(directory, files, checksums=False))  # sizes: at once, cheaply
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashed = pool.submit(file_problems, directory, files) if verify else None
            try:
                for reading, read in self._readers():
                    read(directory)
            except (MemoryError, PermissionError):  # the machine's or the operator's trouble, not the files'
                raise
            except Exception as exc:  # a damaged file shows as any error of the reader that meets it
                if hashed is not None:
                    self._refuse(directory, hashed.result())  # the checksum names the cause
                raise VersionCorrupt(f"version {info.version} at {directory}: cannot read {reading}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            if hashed is not None:
                self._refuse(directory, hashed.result())

    def _refuse(self, directory: Path, problems: list[str]) -> None:
        if problems:
            raise VersionCorrupt(
                f"version {self.info.version} at {directory} is damaged: {'; '.join(problems)}; it is not served: "
                f"publish a new version (`ragpipe index SOURCE --full`) or serve another (`ragpipe alias rollback`)"
            )

    def _readers(self) -> list[tuple[str, Callable[[Path], None]]]:
        return [(VECTORS_FILE, self._read_hnsw), (f"{POSTINGS_FILE} and {VOCAB_FILE}", self._read_bm25),
                (CHUNKS_FILE, self._read_chunks), (MATRIX_FILE, self._read_matrix)]

    def _read_hnsw(self, directory: Path) -> None:
        import hnswlib

        self.dim = int(self.manifest["model"]["dim"])
        self.hnsw = hnswlib.Index(space=self.manifest["metric"], dim=self.dim)
        self.hnsw.load_index(str(directory / VECTORS_FILE))
        self._ef = EfGate()

    def _read_bm25(self, directory: Path) -> None:
        self.bm25 = BM25Scorer(BM25Tables.read(directory), Analyzer())
        self.bm25_row = {int(k): i for i, k in enumerate(self.bm25.keys.tolist())}

    def _read_chunks(self, directory: Path) -> None:
        chunks = pq.read_table(directory / CHUNKS_FILE, schema=CHUNK_SCHEMA)
        self.size = chunks.num_rows
        self.keys = chunks.column("chunk_key").to_numpy()
        self.row = {int(k): i for i, k in enumerate(self.keys.tolist())}
        # kept as Arrow arrays and read row by row for the few rows a query returns, rather than as
        # Python objects for every chunk (a str, int or list object per cell)
        self.columns = {name: Column(chunks.column(name)) for name in CHUNK_SCHEMA.names if name != "chunk_key"}
        self._metadata_cache: dict[int, dict[str, Any]] = {}
        self._last_valid_from = pc.max(chunks.column("valid_from")).as_py() if self.size else None

    def _read_matrix(self, directory: Path) -> None:
        self.matrix = np.load(directory / MATRIX_FILE, mmap_mode="r")
        if self.matrix.shape != (self.size, self.dim):
            raise ValueError(f"shape {self.matrix.shape}, expected ({self.size}, {self.dim})")

    def knn_query(self, vectors: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        """HNSW labels and distances of the ``k`` nearest chunks at breadth ``max(ef, k)`` (None:
        ``DEFAULT_EF``), safe beside other threads (the graph's ef is shared: set it only through here)."""
        return self._ef.knn_query(self.hnsw, vectors, k, DEFAULT_EF if ef is None else ef)

    def vector_search(self, vector: np.ndarray, n: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        """HNSW top-n; exact search over the full-precision matrix when n covers the whole version or
        the graph cannot return n neighbours (hnswlib raises then)."""
        if n < self.size:
            try:
                found = self.knn_query(vector, n, ef)
                return found[0][0], found[1][0]
            except RuntimeError:
                logger.info("HNSW returned fewer than %d neighbours; searching exactly", n)
        scores = np.asarray(self.matrix, dtype=np.float32) @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:n]
        return self.keys[order], (1.0 - scores[order]).astype(np.float32)

    def vectors(self, keys: list[int]) -> np.ndarray:
        """Full-precision vectors of chunks (the version's vector matrix, memory-mapped)."""
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.matrix[[self.row[k] for k in keys]], dtype=np.float32)

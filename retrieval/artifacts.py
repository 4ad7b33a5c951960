"""Artifact store: where each version's immutable files live (a directory, or any pyarrow.fs URL).

Layout: ``ROOT/INDEX/VERSION/{manifest.json, chunks.parquet, vectors.hnsw, bm25_postings.parquet,
bm25_vocab.parquet}``. A version is written into a temporary directory and appears under its final
name only when complete (a rename locally, an upload followed by the manifest remotely), so a reader
never sees a partial version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: the chunk table has a context column (format 1 versions read it as null: no context)
CHUNKS_FILE = "chunks.parquet"
VECTORS_FILE = "vectors.hnsw"
MATRIX_FILE = "vectors.npy"  # full-precision vectors, row i = row i of the chunk table
METRIC = "ip"  # inner product on L2-normalized vectors = cosine
DOWNLOAD_SUFFIX = ".download"  # a copy being downloaded; renamed to the version's name when complete

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_key", pa.int64()),
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("chunk_hash", pa.string()),
        ("ordinal", pa.int32()),
        ("heading_path", pa.list_(pa.string())),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("token_count", pa.int32()),
        ("text", pa.string()),
        ("source_uri", pa.string()),
        ("metadata", pa.string()),  # JSON object
        ("valid_from", pa.timestamp("us", tz="UTC")),
        ("context", pa.string()),  # the line the chunk was indexed with ("" when none), see indexed_text
        # pages of documents that have them (PDF); versions written before read them as None
        ("page_start", pa.int32()),
        ("page_end", pa.int32()),
        ("page_label_start", pa.string()),
        ("page_label_end", pa.string()),
    ]
)

PAGE_COLUMNS = ("page_start", "page_end", "page_label_start", "page_label_end")


def indexed_text(context: str | None, text: str) -> str:
    """A chunk's text as embedded, BM25-indexed and reranked: prefixed with its context (its
    document's title) unless it begins with it."""
    if not context or text.startswith(context):
        return text
    return f"{context}\n\n{text}"


def is_remote(artifact_uri: str) -> bool:
    """Whether a version's files live in an object store (readers use a downloaded copy)."""
    return "://" in artifact_uri and not artifact_uri.startswith("file://")


def download_directory(artifact_uri: str, cache_dir: Path) -> Path:
    """Where a retriever keeps its downloaded copy of a remote version under ``cache_dir``."""
    return cache_dir / artifact_uri.replace("://", "/").replace(":", "_")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_root(version_uri: str) -> str:
    """The artifact store's root of a version's URI (``ROOT/INDEX/VERSION``)."""
    if "://" not in version_uri:
        return str(Path(version_uri).parent.parent)
    return version_uri.rstrip("/").rsplit("/", 2)[0]


class ArtifactStore:
    """Versions' files under ``uri`` (a local path, ``file://`` URL, or any URL pyarrow.fs opens).

    Remote versions are downloaded once into ``cache_dir`` for reading.
    """

    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.uri = uri.rstrip("/")
        self.cache_dir = cache_dir
        self._local_root: Path | None = None
        if "://" not in uri:
            self._local_root = Path(uri)
        elif uri.startswith("file://"):
            self._local_root = Path(uri[len("file://") :])

    @property
    def is_local(self) -> bool:
        return self._local_root is not None

    def version_uri(self, index: str, version: str) -> str:
        if self._local_root is not None:
            return str((self._local_root / index / version).resolve())
        return f"{self.uri}/{index}/{version}"

    @contextmanager
    def writing(self, index: str, version: str) -> Iterator[Path]:
        """Yield an empty local directory; on success it becomes the version's files."""
        if self._local_root is not None:
            parent = self._local_root / index
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=parent))
            try:
                yield tmp
                tmp.rename(parent / version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.cache_dir))
        try:
            yield tmp
            self._upload(tmp, index, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _upload(self, local: Path, index: str, version: str) -> None:
        from pyarrow import fs

        filesystem, base = fs.FileSystem.from_uri(self.version_uri(index, version))
        filesystem.create_dir(base, recursive=True)
        # the manifest goes last: a version without one is incomplete and never read
        names = sorted(p.name for p in local.iterdir() if p.name != MANIFEST) + [MANIFEST]
        for name in names:
            fs.copy_files(str(local / name), f"{base}/{name}", destination_filesystem=filesystem)

    def local_path(self, index: str, version: str) -> Path:
        """A local directory holding the version's files (downloaded first when remote)."""
        if self._local_root is not None:
            return self._local_root / index / version
        target = self.cache_dir / index / version
        if not (target / MANIFEST).is_file():
            from pyarrow import fs

            filesystem, base = fs.FileSystem.from_uri(self.version_uri(index, version))
            partial = target.with_name(f".{version}{DOWNLOAD_SUFFIX}")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            fs.copy_files(base, str(partial), source_filesystem=filesystem)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target

    def exists(self, index: str, version: str) -> bool:
        if self._local_root is not None:
            return (self._local_root / index / version / MANIFEST).is_file()
        from pyarrow import fs

        filesystem, base = fs.FileSystem.from_uri(self.version_uri(index, version))
        return filesystem.get_file_info(f"{base}/{MANIFEST}").type == fs.FileType.File

    def remove(self, index: str, version: str) -> None:
        if self._local_root is not None:
            shutil.rmtree(self._local_root / index / version, ignore_errors=True)
        else:
            from pyarrow import fs

            filesystem, base = fs.FileSystem.from_uri(self.version_uri(index, version))
            try:
                filesystem.delete_dir(base)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.cache_dir / index / version, ignore_errors=True)

    def remove_partials(self, index: str) -> None:
        """Delete temporary directories a killed build left behind (local stores)."""
        if self._local_root is not None:
            for path in (self._local_root / index).glob(".*"):
                shutil.rmtree(path, ignore_errors=True)
        for path in (self.cache_dir / index).glob(".*") if (self.cache_dir / index).is_dir() else []:
            shutil.rmtree(path, ignore_errors=True)

    # -- run workspaces: files an orchestrated run hands from one step (process) to the next ---------

    def run_file_uri(self, index: str, run_id: int, name: str) -> str:
        if self._local_root is not None:
            return str((self._local_root / index / RUNS_DIR / str(run_id) / name).resolve())
        return f"{self.uri}/{index}/{RUNS_DIR}/{run_id}/{name}"

    def write_run_table(self, index: str, run_id: int, name: str, table: pa.Table) -> str:
        """Write a Parquet file into the run's workspace; return its URI."""
        uri = self.run_file_uri(index, run_id, name)
        filesystem, path = _filesystem(uri)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=filesystem, compression="snappy")
        return uri

    @staticmethod
    def read_run_table(uri: str) -> pa.Table:
        filesystem, path = _filesystem(uri)
        return pq.read_table(path, filesystem=filesystem)

    def remove_run_files(self, index: str, run_id: int | None = None) -> None:
        """Delete one run's workspace, or (``run_id`` None) every run workspace of the index."""
        uri = self.run_file_uri(index, run_id, "x").rsplit("/", 1)[0] if run_id is not None else \
            self.run_file_uri(index, 0, "x").rsplit("/", 2)[0]
        filesystem, path = _filesystem(uri)
        try:
            filesystem.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def read_manifest(self, index: str, version: str) -> dict[str, Any]:
        return json.loads((self.local_path(index, version) / MANIFEST).read_text())


RUNS_DIR = "_runs"


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)

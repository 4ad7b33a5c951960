"""Artifact store: where each version's immutable files live (a directory, or any pyarrow.fs URL).

Layout: ``ROOT/INDEX/VERSION/{manifest.json, chunks.parquet, vectors.hnsw, bm25_postings.parquet,
bm25_vocab.parquet}``. A version is written into a temporary directory and appears under its final
name only when complete (a rename locally, an upload followed by the manifest remotely), so a reader
never sees a partial version.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import VersionCorrupt

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: the chunk table has a context column (format 1 versions read it as null: no context)
CHUNKS_FILE = "chunks.parquet"
VECTORS_FILE = "vectors.hnsw"
MATRIX_FILE = "vectors.npy"  # full-precision vectors, row i = row i of the chunk table
METRIC = "ip"  # inner product on L2-normalized vectors = cosine
DOWNLOAD_SUFFIX = ".download"  # a copy being downloaded; renamed to the version's name when complete
# bytes per read request of a download: pyarrow's default (1 MiB) makes a request per MiB, each an
# object store round trip (and on moto's server a copy of the object: a 150 MB file took 20 s in
# 1 MiB reads, 1.2 s in 32 MiB ones)
DOWNLOAD_CHUNK = 32 * 2**20

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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def indexed_text(context: str | None, text: str) -> str:
    """A chunk's text as embedded, BM25-indexed and reranked: prefixed with its context (its
    document's title and the chunk's heading path) unless it begins with it."""
    if not context or text.startswith(context):
        return text
    return f"{context}\n\n{text}"


def is_remote(artifact_uri: str) -> bool:
    """Whether a version's files live in an object store (readers use a downloaded copy)."""
    return "://" in artifact_uri and not artifact_uri.startswith("file://")


def download_directory(artifact_uri: str, cache_dir: Path) -> Path:
    """Where a retriever keeps its downloaded copy of a remote version under ``cache_dir``."""
    return cache_dir / artifact_uri.replace("://", "/").replace(":", "_")


def download_tree(uri: str, target: Path, marker: str = MANIFEST) -> Path:
    """A local copy of the remote directory ``uri`` at ``target``, downloaded once: into a partial
    directory of its own renamed when complete, so that a copy holding ``marker`` is always whole
    (processes downloading the same copy at once each use their own; the first rename wins).

    Raises:
        OSError: the files cannot be listed or read.
    """
    if (target / marker).is_file():
        return target
    from pyarrow import fs

    filesystem, base = fs.FileSystem.from_uri(uri)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{DOWNLOAD_SUFFIX}")
    partial.mkdir(parents=True)
    try:
        fs.copy_files(base, str(partial), source_filesystem=filesystem, chunk_size=DOWNLOAD_CHUNK)
        if not (target / marker).is_file():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy (one without its marker)
            try:
                partial.rename(target)
            except OSError:
                if not (target / marker).is_file():
                    raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# -- reading a version: what its manifest promises, checked ------------------------------------------

_MANIFEST_SECTIONS = {"model": dict, "metric": str, "bm25": dict, "counts": dict, "files": dict}


def read_manifest(directory: Path, version: str) -> dict[str, Any]:
    """The version's manifest, parsed and with the sections readers rely on.

    Raises:
        VersionCorrupt: the manifest is missing, not JSON, not an object or lacks a section.
    """
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VersionCorrupt(f"version {version}: {MANIFEST} is missing from {directory}") from exc
    except (ValueError, OSError) as exc:  # not UTF-8, not JSON, unreadable
        raise VersionCorrupt(f"version {version}: {path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise VersionCorrupt(f"version {version}: {path} holds a JSON {type(manifest).__name__}, not an object")
    missing = [key for key, kind in _MANIFEST_SECTIONS.items() if not isinstance(manifest.get(key), kind)]
    if missing:
        raise VersionCorrupt(f"version {version}: {path} lacks {', '.join(missing)}")
    if not all(isinstance(f, dict) and "bytes" in f and "sha256" in f for f in manifest["files"].values()):
        raise VersionCorrupt(f"version {version}: {path} lists files without their size and checksum")
    return manifest


def file_problems(directory: Path, files: Mapping[str, Mapping[str, Any]], *, checksums: bool = True) -> list[str]:
    """What is wrong with the files a manifest lists: missing, another size, or (``checksums``)
    another SHA-256. Files are hashed in parallel threads (hashlib releases the GIL).

    Returns:
        One line per damaged file, naming it; empty when every file is as the manifest says.
    """
    problems: dict[str, str] = {}
    intact = []
    for name, info in files.items():
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            problems[name] = f"file {name} is missing"
            continue
        if size != info.get("bytes"):
            problems[name] = (f"file {name} does not match its manifest checksum: it has {size} bytes, the "
                              f"manifest says {info.get('bytes')} (truncated or rewritten)")
        else:
            intact.append(name)
    if checksums and intact:
        with ThreadPoolExecutor(max_workers=min(len(intact), os.cpu_count() or 1)) as pool:
            digests = {name: pool.submit(sha256_file, directory / name) for name in intact}
        for name, digest in digests.items():
            try:
                if digest.result() != files[name].get("sha256"):
                    problems[name] = f"file {name} does not match its manifest checksum"
            except OSError as exc:
                problems[name] = f"file {name} cannot be read: {exc}"
    return [problems[name] for name in sorted(problems)]


# -- writing files: a full disk must fail as an OSError naming the file, never as a signal ---------

DISK_FULL_SLACK = 1 << 20  # an incomplete write with less than this free is taken for a full disk


class WriteFailed(OSError):
    """An OSError met while writing one of a version's files; ``filename`` names the file."""


_Target = TypeVar("_Target", Path, str)


@contextmanager
def writing_file(path: _Target) -> Iterator[_Target]:
    """Raise any OSError met while writing ``path`` as :class:`WriteFailed` naming the file (pyarrow's
    errors carry no name), so that callers tell a failed write from a failed read."""
    try:
        yield path
    except WriteFailed:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise WriteFailed(exc.errno or errno.EIO, reason, str(path)) from exc


def allocate_matrix(path: Path, shape: tuple[int, int], dtype: Any = np.float32) -> np.memmap:
    """A new ``.npy`` file of ``shape``, mapped for writing, every block allocated before mapping.

    A write into a memory-mapped page the filesystem cannot back kills the process with SIGBUS
    (``np.lib.format.open_memmap`` maps a sparse file); allocating first makes a full disk fail
    here, as :class:`WriteFailed` (ENOSPC) naming the file.
    """
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with writing_file(path), open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        offset = fh.tell()
        fh.flush()
        os.posix_fallocate(fh.fileno(), 0, offset + shape[0] * shape[1] * dtype.itemsize)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


# hnswlib's saveIndex header (hnswalg.h): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData, maxlevel, enterpoint_node, maxM, maxM0, M, mult,
# ef_construction; then the level-0 records, then each element's upper-level link list behind its
# 4-byte length.
_HNSW_HEADER = struct.Struct("<6QiI3QdQ")


def hnsw_file_problem(path: Path) -> str | None:
    """Why the hnswlib index file at ``path`` is incomplete or malformed, or None when its header
    and link-list lengths account for its size exactly (the check hnswlib's loadIndex makes)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_HNSW_HEADER.size)
        if len(head) < _HNSW_HEADER.size:
            return f"{size} bytes, shorter than the index header"
        fields = _HNSW_HEADER.unpack(head)
        count, record = fields[2], fields[3]
        level0_end = _HNSW_HEADER.size + count * record
        if level0_end + 4 * count > size:
            return f"{size} bytes, too short for {count} elements of {record} bytes"
        fh.seek(level0_end)
        tail = fh.read()
    if len(tail) % 4:
        return f"{size} bytes: the link lists end inside a 4-byte word"
    words = np.frombuffer(tail, dtype="<u4").tolist()  # link-list lengths are multiples of 4 bytes
    at = 0
    for _ in range(count):
        if at >= len(words):
            return f"{size} bytes: the link lists of {count} elements do not fit"
        at += 1 + words[at] // 4
    if at != len(words):
        return f"{size} bytes: {4 * (len(words) - at)} bytes follow the last link list"
    return None


def check_hnsw_written(path: Path) -> None:
    """Raise :class:`WriteFailed` naming ``path`` when hnswlib's ``save_index`` left it incomplete.

    hnswlib writes through a C++ stream and ignores write errors, so a full disk leaves a truncated
    file without an error; ENOSPC when the filesystem is (nearly) full, else EIO.
    """
    problem = hnsw_file_problem(path)
    if problem is None:
        return
    code = errno.ENOSPC if shutil.disk_usage(path.parent).free < DISK_FULL_SLACK else errno.EIO
    raise WriteFailed(code, f"{os.strerror(code)} (the HNSW index was written incompletely: {problem})", str(path))


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

    def index_uri(self, index: str) -> str:
        """Where the index's files live (its versions' directories, segments and deletion sets)."""
        if self._local_root is not None:
            return str((self._local_root / index).resolve())
        return f"{self.uri}/{index}"

    def index_directory(self, index: str) -> Path:
        """The local directory of the index's files: the store itself, or its cached copy."""
        return (self._local_root if self._local_root is not None else self.cache_dir) / index

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
            tmp = _new_directory(parent, version)
            try:
                yield tmp
                with writing_file(parent / version):
                    tmp.rename(parent / version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = _new_directory(self.cache_dir, version)
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
            with writing_file(f"{self.version_uri(index, version)}/{name}"):
                fs.copy_files(str(local / name), f"{base}/{name}", destination_filesystem=filesystem)

    def local_path(self, index: str, version: str) -> Path:
        """A local directory holding the version's files (downloaded first when remote)."""
        if self._local_root is not None:
            return self._local_root / index / version
        return download_tree(self.version_uri(index, version), self.cache_dir / index / version)

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
        """Write a Parquet file into the run's workspace; return its URI.

        Complete or absent: an object store shows an object only once its upload completed; a
        directory gets a temporary name first, renamed when the file is whole.
        """
        uri = self.run_file_uri(index, run_id, name)
        filesystem, path = _filesystem(uri)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not self.is_local:
            pq.write_table(table, path, filesystem=filesystem, compression="snappy")
            return uri
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            pq.write_table(table, tmp, filesystem=filesystem, compression="snappy")
            filesystem.move(tmp, path)
        finally:
            if filesystem.get_file_info(tmp).type != _missing():
                filesystem.delete_file(tmp)
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


def _new_directory(parent: Path, version: str) -> Path:
    """A fresh hidden directory for a version being written, with the mode the umask gives
    (``tempfile.mkdtemp`` makes 0700, which readers running as another user cannot open)."""
    path = parent / f".{version}.{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _missing() -> Any:
    from pyarrow import fs

    return fs.FileType.NotFound


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)

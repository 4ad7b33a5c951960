"""One segment opened for reading: its arrays memory-mapped, its chunk table mapped as Arrow, its graph loaded.

Opening checks what the segment manifest promises (every file present with its size, and by default
its SHA-256); a damaged segment is refused with a :class:`VersionCorrupt` naming the segment and the
file. A segment is immutable, so one :class:`Segment` object serves every version that lists it, from
any number of threads: the only state a search changes is the graph's search breadth, which the
segment's :class:`~retrieval.vector.EfGate` guards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval.artifacts import CHUNK_SCHEMA, file_problems
from retrieval.errors import VersionCorrupt
from retrieval.segments import files as f
from retrieval.vector import EfGate

DEFAULT_EF = 100  # the search breadth of a segment whose manifest records none


class Segment:
    """The files of one segment, ready to search. Attributes are read-only views of the files."""

    def __init__(self, directory: Path, *, verify: bool = True) -> None:
        """Open the segment in ``directory``.

        Args:
            verify: check every file's SHA-256 against the manifest (sizes are always checked).

        Raises:
            VersionCorrupt: a file is missing, of another size or checksum, or unreadable.
        """
        self.directory = Path(directory)
        self.manifest = f.read_segment_manifest(self.directory)
        self.name = self.manifest.name
        problems = file_problems(self.directory, self.manifest.file_table(), checksums=verify)
        if problems:
            raise VersionCorrupt(f"segment {self.name} at {self.directory} is damaged: {'; '.join(problems)}")
        reading = ""
        try:
            reading = "arrays"
            self.keys = self._array(f.KEYS_FILE, np.int64, (self.rows,))
            self.sorted_keys = self._array(f.SORTED_KEYS_FILE, np.int64, (self.rows,))
            self.key_rows = self._array(f.KEY_ROWS_FILE, np.int64, (self.rows,))
            self.vectors = self._array(f.VECTORS_FILE, np.float32, (self.rows, self.manifest.dim))
            self._vector_file = open(self.directory / f.VECTORS_FILE, "rb", buffering=0)  # noqa: SIM115
            self._vector_offset = _data_offset(self._vector_file)
            self.doc_lengths = self._array(f.DOC_LENGTHS_FILE, np.int32, (self.rows,))
            terms = self.manifest.terms
            self.term_hashes = self._array(f.TERM_HASHES_FILE, np.uint64, (terms,))
            self.df = self._array(f.DF_FILE, np.int32, (terms,))
            self.offsets = self._array(f.OFFSETS_FILE, np.int64, (terms + 1,))
            self.posting_rows = self._array(f.POSTING_ROWS_FILE, np.int32, (self.manifest.postings,))
            self.posting_tfs = self._array(f.POSTING_TFS_FILE, np.int32, (self.manifest.postings,))
            reading = f.CHUNKS_FILE
            self.chunks = _mapped_table(self.directory / f.CHUNKS_FILE)
            if self.chunks.schema != CHUNK_SCHEMA or self.chunks.num_rows != self.rows:
                raise ValueError(f"{self.chunks.num_rows} rows of schema {self.chunks.schema.names}")
            reading = f.GRAPH_FILE
            self.graph = self._load_graph() if self.indexed else None
        except VersionCorrupt:
            raise
        except (MemoryError, PermissionError):
            raise
        except Exception as exc:  # a file that passed its checksum yet does not read: a writer's bug
            raise VersionCorrupt(f"segment {self.name} at {self.directory}: cannot read {reading}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        self._ef = EfGate()

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def indexed(self) -> bool:
        """Whether the segment has an HNSW graph (a small one is searched exactly instead)."""
        return not self.manifest.exact

    @property
    def ef(self) -> int:
        """The search breadth measured for this segment (``DEFAULT_EF`` when none was)."""
        return self.manifest.ef_search or DEFAULT_EF

    def _array(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """The memory-mapped array in ``name``, as a plain ndarray view of the mapping (np.memmap's
        subclass hooks cost more than the lookups themselves)."""
        try:
            array = np.load(self.directory / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VersionCorrupt(f"segment {self.name} at {self.directory}: cannot read {name}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if array.dtype != np.dtype(dtype) or array.shape != shape:
            raise VersionCorrupt(f"segment {self.name}: {name} holds {array.dtype} {array.shape}, "
                                 f"expected {np.dtype(dtype)} {shape}")
        return np.asarray(array)

    def _load_graph(self) -> Any:
        import hnswlib

        graph = hnswlib.Index(space=self.manifest.metric, dim=self.manifest.dim)
        graph.load_index(str(self.directory / f.GRAPH_FILE))
        if graph.get_current_count() != self.rows:
            raise VersionCorrupt(f"segment {self.name}: {f.GRAPH_FILE} holds {graph.get_current_count()} vectors, "
                                 f"the segment {self.rows}")
        return graph

    # -- lookups --------------------------------------------------------------------------------------

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The rows of chunk ``keys`` in this segment; -1 where a key is not in it."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.rows == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted_keys, keys), self.rows - 1)
        return np.where(self.sorted_keys[at] == keys, self.key_rows[at], -1)

    def postings(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The postings of the terms with ``hashes`` (uint64), one term after the other in the order
        given: (index into ``hashes``, row, term frequency) per posting; a term not in the segment
        has none."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(self.term_hashes) or not len(hashes):
            return _NO_ROWS, _NO_ROWS, _NO_ROWS
        at = np.minimum(np.searchsorted(self.term_hashes, hashes), len(self.term_hashes) - 1)
        found = self.term_hashes[at] == hashes
        starts = np.where(found, self.offsets[at], 0)
        counts = np.where(found, self.offsets[at + 1] - self.offsets[at], 0)
        index = concat_ranges(starts, counts)
        return np.repeat(np.arange(len(hashes)), counts), self.posting_rows[index], self.posting_tfs[index]

    def stored_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows``, read from the vector file by position rather than through its
        mapping: a few rows read at random from a mapping make whole large pages of it resident
        (2 MB a row on current kernels), so a serving process that rescored through the mapping
        would soon hold a second copy of every vector beside its graph's."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.manifest.dim), dtype=np.float32)
        width = out.itemsize * self.manifest.dim
        fd = self._vector_file.fileno()
        for i, row in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(fd, width, self._vector_offset + row * width), dtype=np.float32)
        return out

    def terms(self) -> list[str]:
        """The segment's vocabulary in term-hash order (what merges map to the merged vocabulary)."""
        return _mapped_table(self.directory / f.TERMS_FILE).column("term").to_pylist()

    def chunk(self, row: int) -> dict[str, Any]:
        """The chunk table's row ``row`` as Python values."""
        return self.chunks.slice(row, 1).to_pylist()[0]

    def knn(self, vectors: np.ndarray, k: int, ef: int | None = None,
            filter: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's labels (chunk keys) and distances of the ``k`` nearest chunks at breadth
        ``max(ef or self.ef, k)``, skipping labels ``filter`` refuses; hnswlib's RuntimeError (fewer
        than ``k`` found) passes through. A segment without a graph raises RuntimeError too: it is
        searched exactly (see ``SegmentedVersion``)."""
        if self.graph is None:
            raise RuntimeError(f"segment {self.name} has no graph: search it exactly")
        return self._ef.knn_query(self.graph, vectors, k, ef or self.ef, filter=filter)


_NO_ROWS = np.zeros(0, dtype=np.int32)


def _data_offset(file: Any) -> int:
    """Where the data of the ``.npy`` file open in ``file`` begins (after its header)."""
    file.seek(0)
    major, _minor = np.lib.format.read_magic(file)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    read_header(file)  # the header's length depends on its version
    offset = file.tell()
    file.seek(0)
    return offset


def sorted_contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is in the ascending ``sorted_keys``, by binary search: the cost is
    that of ``keys``, however large the sorted array (a segment's keys, memory-mapped)."""
    keys = np.asarray(keys, dtype=np.int64)
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.asarray(sorted_keys[at] == keys)


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices ``starts[i] .. starts[i] + counts[i] - 1`` for every i, concatenated in order."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(np.asarray(starts) - (ends - counts), counts) + np.arange(total)


def _mapped_table(path: Path) -> pa.Table:
    """An Arrow IPC file as a table whose buffers are the memory-mapped file (no copy)."""
    with pa.ipc.open_file(pa.memory_map(str(path), "r")) as reader:
        return reader.read_all()

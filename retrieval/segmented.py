"""A segmented version (manifest format 3) loaded for serving, behind the interface the ranker reads.

The version's segments come from a :class:`SegmentPools` the retriever holds for its whole life: a
segment listed by several versions (the live one, a canary, warm ones) is opened once, so loading
the next version reads only the segments it adds. Remote versions' segments come from the segment
cache (retrieval.segments.cache), which downloads only those it lacks.

Rows: the ranker and rerankers address a chunk by a row number (``version.row[key]``); here a row
is the chunk's segment's offset in the version plus its row in the segment, so that per-row arrays
(``bm25.top``'s all-scores) are the segments' arrays concatenated.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from retrieval.artifacts import CHUNK_SCHEMA, MANIFEST
from retrieval.bm25 import ANALYZER_VERSION
from retrieval.errors import VersionCorrupt, VersionUnavailable
from retrieval.loaded import VersionReads
from retrieval.segments.manifest import VersionManifest, SegmentStore
from retrieval.segments.search import SegmentedVersion, SegmentPool


def read_version_manifest(directory: Path, version: str) -> VersionManifest:
    """The format-3 manifest in a version's directory.

    Raises:
        VersionCorrupt: missing, not JSON, or not a valid segmented manifest (naming the field).
    """
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise VersionCorrupt(f"version {version}: {MANIFEST} is missing from {directory}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise VersionCorrupt(f"version {version}: {path} cannot be read ({exc})") from exc
    manifest = VersionManifest.from_json(text, f"version {version} ({path})")
    if manifest.version != version:
        raise VersionCorrupt(f"version {version}: its manifest at {path} names version {manifest.version!r}")
    return manifest


def manifest_format(directory: Path) -> int:
    """The ``format`` a version's manifest declares (0 when it cannot be read: the reader then says why)."""
    try:
        value = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("format", 1)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


class SegmentPools:
    """One :class:`SegmentPool` per segment store (an index's directory, or its downloaded copy)."""

    def __init__(self, *, verify: bool = True) -> None:
        self.verify = verify
        self._pools: dict[Path, SegmentPool] = {}
        self._lock = threading.Lock()

    def pool(self, root: Path) -> SegmentPool:
        with self._lock:
            pool = self._pools.get(root)
            if pool is None:
                pool = self._pools[root] = SegmentPool(SegmentStore(root), verify=self.verify)
            return pool

    def retain(self, versions: Iterable[Any]) -> None:
        """Close every segment that none of ``versions`` (loaded versions) lists."""
        keep: dict[Path, set[str]] = {}
        views: dict[Path, set[tuple[str, str | None]]] = {}
        for version in versions:
            if isinstance(version, SegmentedLoaded):
                keep.setdefault(version.root, set()).update(version.version_manifest.segment_names)
                views.setdefault(version.root, set()).update(
                    (ref.name, ref.deletions) for ref in version.version_manifest.segments)
        with self._lock:
            pools = dict(self._pools)
        for root, pool in pools.items():
            pool.retain(keep.get(root, set()), views.get(root, set()))

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            pools = list(self._pools.values())
        return sorted(name for pool in pools for name in pool.loaded)


class _Column:
    """One chunk-table column of the version, addressed by version row."""

    def __init__(self, version: "SegmentedLoaded", name: str) -> None:
        self._version, self._name = version, name

    def __getitem__(self, row: int) -> Any:
        part, local = self._version.locate(row)
        return part.segment.chunks.column(self._name)[local].as_py()


class _Rows:
    """``rows[key]``: the version row of a live chunk key (KeyError for any other key)."""

    def __init__(self, version: "SegmentedLoaded") -> None:
        self._version = version

    def __getitem__(self, key: int) -> int:
        version = self._version
        for offset, part, (low, high) in zip(version.offsets, version.segmented.parts, version.key_bounds):
            if low <= key <= high:  # a segment's keys lie between its least and its greatest
                seg = part.segment
                at = int(seg.sorted_keys.searchsorted(key))
                if at < seg.rows and int(seg.sorted_keys[at]) == key:
                    row = int(seg.key_rows[at])
                    if part.live is None or part.live[row]:
                        return offset + row
        raise KeyError(key)

    def __iter__(self) -> Iterator[int]:
        """The live chunk keys, ascending."""
        return iter(self._version.segmented.live_keys().tolist())

    def __len__(self) -> int:
        return self._version.size

    def __contains__(self, key: int) -> bool:
        try:
            self[key]
            return True
        except KeyError:
            return False


class _RowScores:
    """Every version row's BM25 score for one query, read from the segments' positive scores (a
    segment's rows without one score 0). What the rescorer reads: ``scores[row]``, ``max()`` and
    ``len()``."""

    def __init__(self, version: "SegmentedLoaded", scores: list[Any]) -> None:
        self._version, self._scores = version, scores

    def __getitem__(self, row: int) -> float:
        at = bisect.bisect_right(self._version.offsets, row) - 1
        return float(self._scores[at].at(np.array([row - self._version.offsets[at]]))[0])

    def __len__(self) -> int:
        return self._version.size

    def max(self) -> float:
        return max((float(s.scores.max()) for s in self._scores if len(s.scores)), default=0.0)


class _Bm25:
    def __init__(self, version: "SegmentedLoaded") -> None:
        self._version = version

    def top(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray, _RowScores]:
        """(chunk keys, scores, every row's score) of the ``n`` best chunks with a positive score."""
        segmented = self._version.segmented
        scores = segmented.bm25_all(query)
        keys, best = segmented.bm25_top(query, n, scores)
        return keys, best, _RowScores(self._version, scores)


class SegmentedLoaded(VersionReads):
    """A format-3 version ready to serve; immutable once built, thread-safe reads."""

    def __init__(self, info: Any, directory: Path, pools: SegmentPools,
                 segments: Callable[[VersionManifest], AbstractContextManager[Path]] | None = None) -> None:
        """Read the version manifest in ``directory`` and open its segments from ``pools``.

        Args:
            segments: for a remote version, what makes its segments present locally and yields the
                store root they are under while they are opened (the segment cache's ``loading``);
                None: the version's store is the directory's parent.

        Raises:
            VersionCorrupt: the manifest, a segment or a deletion file is damaged (named).
            VersionUnavailable: the version was made with another model or analyzer than it should.
        """
        self.info = info
        self.version_manifest = read_version_manifest(directory, info.version)
        vm = self.version_manifest
        if vm.model_id != info.model_id:
            raise VersionUnavailable(f"version {info.version}: manifest names model {vm.model_id!r}, the registry "
                                     f"{info.model_id!r}")
        if vm.analyzer != ANALYZER_VERSION:
            raise VersionUnavailable(f"version {info.version} was analyzed with {vm.analyzer!r}; this library reads "
                                     f"{ANALYZER_VERSION!r}: rebuild it with `ragpipe index SOURCE --full`")
        self.manifest: dict[str, Any] = vm.to_dict()
        try:
            with segments(vm) if segments is not None else nullcontext(directory.parent) as root:
                self.root = root
                self.segmented = SegmentedVersion(vm, pools.pool(root))
        except VersionCorrupt as exc:
            raise VersionCorrupt(f"version {info.version} is damaged: {exc}; it is not served: publish a new "
                                     f"version (`ragpipe index SOURCE --full`) or serve another "
                                     f"(`ragpipe alias rollback`)") from exc
        self.size = vm.chunks
        self.dim = vm.dim
        self.offsets = list(np.cumsum([0] + [p.segment.rows for p in self.segmented.parts])[:-1].tolist())
        self.key_bounds = [(int(p.segment.sorted_keys[0]), int(p.segment.sorted_keys[-1])) if p.segment.rows else (1, 0)
                           for p in self.segmented.parts]
        self.row = _Rows(self)
        self.bm25_row = self.row
        self.bm25 = _Bm25(self)
        self.columns = {name: _Column(self, name) for name in CHUNK_SCHEMA.names if name != "chunk_key"}
        self._metadata_cache: dict[int, dict[str, Any]] = {}
        latest = [pc.max(p.segment.chunks.column("valid_from")).as_py() for p in self.segmented.parts
                  if p.segment.rows]
        latest = [t for t in latest if t is not None]
        self._last_valid_from = max(latest) if latest else None

    @property
    def segment_names(self) -> list[str]:
        return self.version_manifest.segment_names

    def fields(self, row: int, names: Sequence[str]) -> dict[str, Any]:
        part, local = self.locate(row)
        table = part.segment.chunks
        return {name: table.column(name)[local].as_py() for name in names}

    def locate(self, row: int) -> tuple[Any, int]:
        at = bisect.bisect_right(self.offsets, row) - 1
        return self.segmented.parts[at], row - self.offsets[at]

    def knn_query(self, vectors: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and distances of the ``k`` nearest live chunks of each query, one row per query."""
        found = [self.segmented.knn(v, k, ef) for v in np.atleast_2d(vectors)]
        return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])

    def vector_search(self, vector: np.ndarray, n: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        """HNSW top-n over every segment (a segment with too few live chunks is searched exactly)."""
        return self.segmented.knn(vector, n, ef)

    def vectors(self, keys: list[int]) -> np.ndarray:
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.segmented.vectors_of(keys)

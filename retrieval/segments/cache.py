"""The segment cache: remote versions' segments and deletion sets, downloaded once, checked, bounded.

A retriever serving versions from an object store keeps their segments under
``HOME/cache/segment-cache/<store path>/INDEX/{segments,deletions}``, a store laid out like the
artifact store itself (:class:`~retrieval.segments.manifest.SegmentStore` reads it). Loading a
version downloads only what the cache lacks:

- **complete or absent**: a segment is downloaded into a hidden directory of its own, its files
  checked against the SHA-256 checksums of its segment manifest, and renamed to its name only when
  whole and intact; a deletion set likewise, against the checksum its version manifest records. A
  damaged download is refused (:class:`VersionCorrupt` naming the segment) and never enters the cache.
- **bounded**: when the cache holds more than its bound, the least recently used segments and
  deletion sets that no loaded version of any process on the cache uses are removed
  (:func:`plan_eviction`, a pure function over :class:`CacheEntry` values); what a loaded version
  uses is never removed, even over the bound.
- **shared**: processes on one cache hold a shared ``flock`` while they download and open
  segments, and eviction takes it exclusively; each process lists what its loaded versions use in a
  lease file (``.leases/PID-TOKEN.json``), so an eviction spares what any live process holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AbstractSet

from retrieval.artifacts import DOWNLOAD_CHUNK, file_problems
from retrieval.errors import VersionCorrupt, VersionUnavailable
from retrieval.segments.files import SEGMENT_MANIFEST, SEGMENT_NAME, SegmentManifest
from retrieval.segments.manifest import DELETIONS_DIR, SEGMENTS_DIR, SegmentRef, VersionManifest

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 20 * 2**30  # RAGPIPE_SEGMENT_CACHE_BYTES
CACHE_DIR = "segment-cache"
LEASES_DIR = ".leases"
LOCK_FILE = ".lock"


# -- planning: pure -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """A segment directory or a deletion file in the cache.

    Attributes:
        key: its path relative to the cache root (what leases list).
        bytes: the size of its files.
        last_used: when a version last loaded it (seconds since the epoch).
    """

    key: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class EvictionPlan:
    """What to remove, and the bytes the cache holds before and after."""

    evict: tuple[CacheEntry, ...]
    total_bytes: int
    remaining_bytes: int
    limit_bytes: int

    @property
    def over_bound(self) -> bool:
        """Whether the cache stays over its bound (what loaded versions hold exceeds it)."""
        return self.remaining_bytes > self.limit_bytes


def plan_eviction(entries: Sequence[CacheEntry], held: AbstractSet[str], limit_bytes: int) -> EvictionPlan:
    """The entries to evict so that the cache holds at most ``limit_bytes``: the least recently used
    first, never one in ``held`` (what loaded versions use); none while the cache is within its bound."""
    total = sum(e.bytes for e in entries)
    remaining = total
    evict: list[CacheEntry] = []
    for entry in sorted((e for e in entries if e.key not in held), key=lambda e: (e.last_used, e.key)):
        if remaining <= limit_bytes:
            break
        evict.append(entry)
        remaining -= entry.bytes
    return EvictionPlan(tuple(evict), total, remaining, limit_bytes)


@dataclass(frozen=True)
class FetchReport:
    """What loading a version downloaded: segment names, deletion files, their bytes, and the
    seconds downloading and checking them took."""

    segments: tuple[str, ...] = ()
    deletions: tuple[str, ...] = ()
    bytes: int = 0
    seconds: float = 0.0

    def __add__(self, other: "FetchReport") -> "FetchReport":
        return FetchReport(self.segments + other.segments, self.deletions + other.deletions, self.bytes + other.bytes,
                           self.seconds + other.seconds)


def index_uri_of(artifact_uri: str) -> str:
    """The index's URI (its segments' and deletion sets' parent) of a version's URI ``INDEX/VERSION``."""
    return artifact_uri.rstrip("/").rsplit("/", 1)[0]


# -- downloading: complete or absent, checked -----------------------------------------------------------

def fetch_missing(manifest: VersionManifest, index_uri: str, root: Path) -> FetchReport:
    """Download the segments and deletion sets of ``manifest`` that the store at ``root`` lacks from
    the index at ``index_uri``, each checked against its checksums before it appears under its name.

    Raises:
        VersionCorrupt: a downloaded segment or deletion set does not match its checksums (named);
            nothing of it is kept.
        VersionUnavailable: the object store cannot be read.
    """
    report = FetchReport()
    started = time.perf_counter()
    for ref in manifest.segments:
        try:
            if not (root / SEGMENTS_DIR / ref.name / SEGMENT_MANIFEST).is_file():
                report += FetchReport(segments=(ref.name,), bytes=_download_segment(ref.name, index_uri, root))
            if ref.deletions is not None and not (root / DELETIONS_DIR / ref.deletions).is_file():
                report += FetchReport(deletions=(ref.deletions,), bytes=_download_deletions(ref, index_uri, root))
        except OSError as exc:
            raise VersionUnavailable(f"version {manifest.version}: cannot download segment {ref.name} from "
                                     f"{index_uri}: {exc}") from exc
    return replace(report, seconds=time.perf_counter() - started) if report.segments or report.deletions else report


def _download_segment(name: str, index_uri: str, root: Path) -> int:
    from pyarrow import fs

    uri = f"{index_uri}/{SEGMENTS_DIR}/{name}"
    filesystem, base = fs.FileSystem.from_uri(uri)
    target = root / SEGMENTS_DIR / name
    partial = _partial(target)
    try:
        fs.copy_files(base, str(partial), source_filesystem=filesystem, chunk_size=DOWNLOAD_CHUNK)
        path = partial / SEGMENT_MANIFEST
        if not path.is_file():
            raise VersionCorrupt(f"segment {name} at {uri} has no {SEGMENT_MANIFEST}: it is incomplete")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VersionCorrupt(f"segment {name} downloaded from {uri}: {SEGMENT_MANIFEST} is not text") from exc
        segment = SegmentManifest.from_json(text, f"segment {name} ({uri}/{SEGMENT_MANIFEST})")
        if segment.name != name:
            raise VersionCorrupt(f"segment {name} downloaded from {uri}: its manifest names it {segment.name!r}")
        problems = file_problems(partial, segment.file_table())
        if problems:
            raise VersionCorrupt(f"segment {name} downloaded from {uri} is damaged: {'; '.join(problems)}")
        size = sum(p.stat().st_size for p in partial.iterdir())
        _install(partial, target)
        return size
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _download_deletions(ref: SegmentRef, index_uri: str, root: Path) -> int:
    from pyarrow import fs

    assert ref.deletions is not None
    uri = f"{index_uri}/{DELETIONS_DIR}/{ref.deletions}"
    filesystem, path = fs.FileSystem.from_uri(uri)
    target = root / DELETIONS_DIR / ref.deletions
    partial = _partial(target, directory=False)
    try:
        fs.copy_files(path, str(partial), source_filesystem=filesystem, chunk_size=DOWNLOAD_CHUNK)
        with open(partial, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest != ref.deletions_sha256:
            raise VersionCorrupt(f"deletion file {ref.deletions} of segment {ref.name} downloaded from {uri} does "
                                 f"not match its manifest checksum")
        size = partial.stat().st_size
        _install(partial, target)
        return size
    finally:
        partial.unlink(missing_ok=True)


def _partial(target: Path, *, directory: bool = True) -> Path:
    """A fresh hidden name beside ``target`` for a download of it (one per download: processes
    downloading the same file never share one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.download")
    if directory:
        partial.mkdir()
    return partial


def _install(partial: Path, target: Path) -> None:
    """Rename a checked download to its name; when another process installed it first, keep theirs
    (the same immutable content) and drop ours."""
    try:
        if partial.is_dir():
            os.rename(partial, target)  # fails on an existing non-empty directory: never replaces one
        else:
            os.link(partial, target)  # fails on an existing file
    except FileExistsError:
        pass
    except OSError as exc:
        if not target.exists():
            raise
        logger.debug("%s was installed by another process (%s)", target, exc)


# -- the cache: shared by processes, bounded --------------------------------------------------------------

class SegmentCache:
    """The bounded, shared cache of remote segments under ``cache_dir/segment-cache``; thread-safe
    within a process (each call takes its own file lock)."""

    def __init__(self, cache_dir: Path, limit_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if limit_bytes < 0:
            raise ValueError(f"segment_cache_bytes must not be negative, got {limit_bytes}")
        self.root = Path(cache_dir) / CACHE_DIR
        self.limit_bytes = limit_bytes
        self._lease = self.root / LEASES_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.json"
        self._held: set[str] = set()
        self._grown = False  # downloaded since the last eviction
        self.fetched = FetchReport()  # everything this process downloaded so far

    def store_root(self, index_uri: str) -> Path:
        """The local store of the index at ``index_uri`` (its segments and deletion sets)."""
        return self.root / index_uri.replace("://", "/").replace(":", "_")

    @contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), kind)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def loading(self, manifest: VersionManifest, index_uri: str) -> Iterator[Path]:
        """Make the version's segments and deletion sets present (downloading what is missing) and
        yield the store root they are under; while the block runs (open them there) no process
        evicts anything, and from its start the lease holds them."""
        root = self.store_root(index_uri)
        with self._locked(fcntl.LOCK_SH):
            self.hold(self._held | set(self.keys(manifest, index_uri)))
            report = fetch_missing(manifest, index_uri, root)
            self.fetched += report
            if report.segments or report.deletions:
                self._grown = True
                logger.info("version %s: downloaded %d segments and %d deletion sets (%d bytes) from %s",
                            manifest.version, len(report.segments), len(report.deletions), report.bytes, index_uri)
            for key in self.keys(manifest, index_uri):
                _touch(self.root / key)
            yield root

    def keys(self, manifest: VersionManifest, index_uri: str) -> list[str]:
        """The cache keys of what ``manifest`` uses."""
        prefix = self.store_root(index_uri).relative_to(self.root)
        out = []
        for ref in manifest.segments:
            out.append(f"{prefix}/{SEGMENTS_DIR}/{ref.name}")
            if ref.deletions is not None:
                out.append(f"{prefix}/{DELETIONS_DIR}/{ref.deletions}")
        return out

    def hold(self, keys: Iterable[str]) -> None:
        """Record what this process's loaded versions use (replacing what it held before)."""
        self._held = set(keys)
        self._lease.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._lease.with_name(f".{self._lease.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(sorted(self._held)), encoding="utf-8")
        os.replace(tmp, self._lease)

    def release(self, keys: Iterable[str]) -> EvictionPlan | None:
        """Hold only ``keys`` from now on, and evict what no process holds while over the bound;
        nothing to do (None) when this process neither let go of anything nor downloaded anything
        since it last did (what other processes let go of goes at their next release, or ours)."""
        keys = set(keys)
        if keys == self._held and not self._grown:
            return None
        self.hold(keys)
        return self.evict()

    def evict(self) -> EvictionPlan:
        """Remove the least recently used entries no live process holds until within the bound."""
        with self._locked(fcntl.LOCK_EX):
            plan = plan_eviction(self.entries(), self.held_by_any(), self.limit_bytes)
            for entry in plan.evict:
                _remove(self.root / entry.key)
            self._remove_partials()
            self._grown = False
        if plan.evict:
            logger.info("segment cache: evicted %d entries (%d bytes); %d bytes held of a %d-byte bound",
                        len(plan.evict), plan.total_bytes - plan.remaining_bytes, plan.remaining_bytes,
                        plan.limit_bytes)
        return plan

    def close(self) -> None:
        """Hold nothing any more (the lease goes)."""
        self._held = set()
        self._lease.unlink(missing_ok=True)

    def held_by_any(self) -> set[str]:
        """What the leases of live processes (this one included) hold; leases of dead ones go."""
        held = set(self._held)
        for lease in (self.root / LEASES_DIR).glob("*.json") if (self.root / LEASES_DIR).is_dir() else []:
            if lease == self._lease:
                continue
            if not _alive(lease.name.split("-", 1)[0]):
                lease.unlink(missing_ok=True)
                continue
            try:
                held.update(json.loads(lease.read_text(encoding="utf-8")))
            except (OSError, ValueError):  # being replaced right now: its owner holds it under the lock
                continue
        return held

    def entries(self) -> list[CacheEntry]:
        """Every complete segment and deletion set in the cache."""
        out = []
        for path in self.root.rglob("*") if self.root.is_dir() else []:
            parent = path.parent.name
            if parent == SEGMENTS_DIR and SEGMENT_NAME.match(path.name) and (path / SEGMENT_MANIFEST).is_file():
                size = sum(p.stat().st_size for p in path.iterdir())
            elif parent == DELETIONS_DIR and path.suffix == ".npy" and not path.name.startswith("."):
                size = path.stat().st_size
            else:
                continue
            out.append(CacheEntry(str(path.relative_to(self.root)), size, path.stat().st_mtime))
        return out

    def _remove_partials(self) -> None:
        """Downloads and evictions a killed process left (under the exclusive lock: none is running)."""
        for pattern in (".*.download", ".*.evicted"):
            for path in list(self.root.rglob(pattern)) if self.root.is_dir() else []:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _remove(path: Path) -> None:
    """Rename away, then delete: a segment is whole under its name or not there at all."""
    doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.evicted")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True

"""Garbage collection after publishing (``ragpipe gc``): old versions, unreferenced segments, finished
runs' workspaces, the embedding cache, the download cache.

Every run already removes the versions beyond the retention and the segments and deletion sets no
retained version lists (``upkeep.collect_garbage``, in the artifact store, local or remote); here
also:

- **run workspaces** (``ROOT/INDEX/_runs/RUN_ID``, pipeline.run_files): the staged tables of runs
  that finished without their gc step removing them (failed, taken over).

- the **embedding cache** (registry): an entry goes when no retained version of any index uses it
  with its model, and it was embedded longer than ``embedding_cache_ttl`` ago. What retained
  versions use always stays, so neither the next incremental run nor a full rebuild embeds anything
  gc removed that it needs; the age keeps what was embedded recently (an edit reverted soon after).
- the **download cache** (``RAGPIPE_HOME/cache``): local copies of remote versions that the registry
  no longer retains (removed or rejected), and unfinished downloads or uploads of them. An
  unfinished one of a retained version goes only once nothing in it changed for
  ``PARTIAL_GRACE_S``: a reader may be downloading it right now.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import IndexConfig
from pipeline.run_files import collect_run_files
from pipeline.runner import artifact_store, collect_garbage
from registry import Registry, VersionListing
from retrieval.artifacts import DOWNLOAD_SUFFIX, download_directory, is_remote

logger = logging.getLogger(__name__)

PARTIAL_GRACE_S = 3600.0
GONE = frozenset({"removed", "rejected"})  # version statuses whose files nobody reads again


@dataclass(frozen=True)
class CachedCopy:
    """A directory of the download cache that holds (part of) one version's files."""

    path: Path
    version: str
    partial: bool  # an unfinished download (or a remote build's files before upload)
    modified: float  # newest modification time of the directory and what it holds


@dataclass(frozen=True)
class DownloadCollection:
    directories: list[str]
    bytes: int


@dataclass(frozen=True)
class GcReport:
    """What ``ragpipe gc`` removed; ``to_dict()`` is what ``--json`` prints."""

    index: str
    versions_removed: list[str]
    rows_removed: int
    stats_removed: int  # serving statistics rows of removed and rejected versions
    segments_removed: list[str]
    deletions_removed: list[str]
    segment_bytes: int
    runs_removed: list[int]
    run_bytes: int
    embeddings_removed: int
    embedding_bytes: int
    embedding_cache_ttl: float
    downloads_removed: list[str]
    download_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "versions_removed": self.versions_removed,
            "rows_removed": self.rows_removed,
            "stats_removed": self.stats_removed,
            "segments": {"segments_removed": self.segments_removed, "deletion_sets_removed": self.deletions_removed,
                         "count": len(self.segments_removed) + len(self.deletions_removed),
                         "bytes_removed": self.segment_bytes},
            "run_files": {"runs_removed": self.runs_removed, "count": len(self.runs_removed),
                          "bytes_removed": self.run_bytes},
            "embedding_cache": {"entries_removed": self.embeddings_removed, "bytes_removed": self.embedding_bytes,
                                "ttl_seconds": self.embedding_cache_ttl},
            "download_cache": {"directories_removed": self.downloads_removed, "bytes_removed": self.download_bytes},
        }


def collect_all(registry: Registry, config: IndexConfig) -> GcReport:
    """Remove ``config.index``'s versions beyond the retention, the segments and deletion sets no
    retained version lists, finished runs' workspaces, its download-cache copies nobody reads any
    more, and the embedding-cache entries no retained version uses that are old enough.

    Raises:
        IndexLocked: a run held the index for ``config.lock_timeout`` seconds; nothing removed.
    """
    store = artifact_store(config, registry.home)
    with registry.index_lock(config.index, config.lock_timeout):
        versions = collect_garbage(registry, store, config.index, config.retention)
        runs = collect_run_files(registry, store, config.index)
        downloads = collect_download_cache(registry.list_versions(config.index), store.cache_dir, config.index)
    # the cache is shared by every index; its own lock serializes this with runs' cache lookups
    cache = registry.collect_embeddings(config.embedding_cache_ttl)
    return GcReport(
        index=config.index, versions_removed=versions["versions_removed"], rows_removed=versions["rows_removed"],
        stats_removed=versions["stats_removed"],
        segments_removed=versions["segments_removed"], deletions_removed=versions["deletions_removed"],
        segment_bytes=versions["segment_bytes_removed"], runs_removed=runs.runs, run_bytes=runs.bytes,
        embeddings_removed=cache.entries, embedding_bytes=cache.bytes, embedding_cache_ttl=config.embedding_cache_ttl,
        downloads_removed=downloads.directories, download_bytes=downloads.bytes,
    )


def collect_download_cache(
    versions: Sequence[VersionListing], cache_dir: Path, index: str, *, now: float | None = None,
) -> DownloadCollection:
    """Delete the download-cache directories of ``index`` that :func:`stale_copies` picks.

    Args:
        versions: every version of the index the registry knows (``Registry.list_versions``).
        cache_dir: the download cache (``RAGPIPE_HOME/cache``).
    """
    doomed = stale_copies(cached_copies(versions, cache_dir, index), versions, now or time.time(), PARTIAL_GRACE_S)
    removed, size = [], 0
    for copy in doomed:
        bytes_held = _size(copy.path)
        try:
            shutil.rmtree(copy.path)
        except OSError as exc:
            logger.warning("cannot remove %s from the download cache: %s", copy.path, exc)
            continue
        removed.append(str(copy.path))
        size += bytes_held
    return DownloadCollection(sorted(removed), size)


def stale_copies(copies: Iterable[CachedCopy], versions: Sequence[VersionListing], now: float,
                 grace_s: float) -> list[CachedCopy]:
    """The copies to delete: any of a version that is gone, unfinished ones idle for ``grace_s``."""
    status = {v.version: v.status for v in versions}
    return [c for c in copies
            if c.version in status and (status[c.version] in GONE or (c.partial and now - c.modified > grace_s))]


def cached_copies(versions: Sequence[VersionListing], cache_dir: Path, index: str) -> list[CachedCopy]:
    """The directories of the download cache that belong to versions of ``index``.

    They sit where the readers put them: ``cache_dir/INDEX/VERSION`` (the artifact store's copy of a
    remote parent, partial ``.VERSION.download``), beside the path of the version's URI (a
    retriever's copy, partial ``VERSION.download``), and ``cache_dir/.VERSION.*`` (a remote build's
    files before upload). Nothing else there (the ONNX export, other indexes) is a candidate.
    """
    names = {v.version for v in versions}
    parents = {cache_dir / index} | {download_directory(v.artifact_uri, cache_dir).parent for v in versions
                                     if v.artifact_uri and is_remote(v.artifact_uri)}
    found = []
    for parent, partial_only in [(cache_dir, True), *((p, False) for p in sorted(parents))]:
        for child in sorted(parent.iterdir()) if parent.is_dir() else []:
            version, partial = copy_version(child.name)
            if version in names and (partial or not partial_only) and child.is_dir() and not child.is_symlink():
                found.append(CachedCopy(child, version, partial, _newest_mtime(child) if partial else 0.0))
    return found


def copy_version(name: str) -> tuple[str, bool]:
    """(version, unfinished) a download-cache directory name stands for."""
    if name.startswith("."):  # .VERSION.download, or tempfile's .VERSION.xxxxxxxx (version names hold no '.')
        return name[1:].split(".", 1)[0], True
    if name.endswith(DOWNLOAD_SUFFIX):
        return name.removesuffix(DOWNLOAD_SUFFIX), True
    return name, False


def _walk(path: Path) -> Iterable[os.stat_result]:
    yield path.lstat()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                yield os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we looked: a download finishing
                continue


def _newest_mtime(path: Path) -> float:
    return max(s.st_mtime for s in _walk(path))


def _size(path: Path) -> int:
    return sum(s.st_size for s in _walk(path) if stat.S_ISREG(s.st_mode))

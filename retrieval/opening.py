"""Opening versions for a retriever: what the registry says of a version, its files read (a whole copy,
or a segmented version over the shared segments), and remote segments from the bounded segment cache.

A version whose files live in an object store is read from a local copy: its manifest is downloaded
once into ``HOME/cache``, its segments and deletion sets into the segment cache
(retrieval.segments.cache), which downloads only what it lacks, checks every file against its
checksums first, and evicts what no loaded version uses when over ``segment_cache_bytes``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.artifacts import is_remote
from retrieval.errors import AliasNotFound, ModelMismatch, VersionCorrupt, VersionUnavailable
from retrieval.loaded import LoadedVersion, VersionInfo, local_directory
from retrieval.segmented import SegmentedLoaded, SegmentPools, manifest_format
from retrieval.segments.cache import SegmentCache, index_uri_of

if TYPE_CHECKING:
    from registry import Registry
    from registry.rows import AliasRow
    from retrieval.config import RetrievalConfig

logger = logging.getLogger("retrieval.retriever")


class VersionOpening:
    """Reading the alias and opening its versions; mixed into :class:`retrieval.retriever.Retriever`."""

    alias: str
    config: RetrievalConfig
    loads: int
    segments: SegmentPools
    segment_cache: SegmentCache
    _registry: Registry
    _registry_lock: threading.Lock
    _cache_dir: Path
    _pinned: set[str]
    _refused: dict[str, str]
    _current: Any

    def _alias_row(self) -> AliasRow:
        with self._registry_lock:
            aliases = self._registry.read(self._registry.list_aliases)  # reconnects if the server dropped it
        row = next((a for a in aliases if a.alias == self.alias), None)
        if row is None:
            raise AliasNotFound(f"alias {self.alias!r} does not exist; publish a version with `ragpipe index`")
        return row

    def _info(self, name: str | None) -> VersionInfo | None:
        if name is None:
            return None
        with self._registry_lock:
            version = self._registry.read(self._registry.get_version, name)
        assert version is not None and version.artifact_uri is not None  # an alias serves built versions only
        uri = version.artifact_uri
        if self.config.artifacts:  # the same layout under another root: ROOT/INDEX/VERSION
            uri = f"{self.config.artifacts.rstrip('/')}/{version.index_name}/{name}"
        return VersionInfo(alias=self.alias, index=version.index_name, version=name,
                           artifact_uri=uri, model_id=version.model_id,
                           updated_at=version.published_at or version.validated_at)

    def _load(self, info: VersionInfo | None) -> LoadedVersion:
        assert info is not None
        wanted = None
        if self.config.model is not None:
            from retrieval.models import model_id_of

            wanted = model_id_of(self.config.model)
        elif self._pinned and info.model_id not in self._pinned:
            wanted = sorted(self._pinned)[0]
        if wanted is not None and wanted != info.model_id:
            raise ModelMismatch(
                f"version {info.version} of alias {self.alias!r} was embedded with {info.model_id!r}; "
                f"queries would be encoded with {wanted!r}. Open the retriever without `model`, or "
                f"publish a version built with that model"
            )
        started = time.perf_counter()
        self.loads += 1
        loaded = self._open_version(info)
        logger.info("loaded version %s (%d chunks) in %.2f s", info.version, loaded.size, time.perf_counter() - started)
        return loaded

    def _open_version(self, info: VersionInfo) -> LoadedVersion:
        """A version read from its files: segmented (format 3) over the shared segments (a remote
        version's from the segment cache), or a whole copy (formats 1 and 2)."""
        directory = local_directory(info.artifact_uri, self._cache_dir)
        if manifest_format(directory) != 3:
            return LoadedVersion(info, directory)
        if not is_remote(info.artifact_uri):
            return SegmentedLoaded(info, directory, self.segments)  # type: ignore[return-value]
        index_uri = index_uri_of(info.artifact_uri)
        return SegmentedLoaded(info, directory, self.segments,  # type: ignore[return-value]
                               lambda manifest: self.segment_cache.loading(manifest, index_uri))

    def _load_or_keep(self, info: VersionInfo) -> LoadedVersion | None:
        """The version loaded, or None (logged) when it cannot be served and the current one stays."""
        try:
            return self._load(info)
        except VersionUnavailable as exc:
            if isinstance(exc, VersionCorrupt):
                self._refused[info.version] = str(exc)  # its files are immutable: loading again cannot help
            logger.error("alias %s names version %s, which cannot be served: %s; still serving %s",
                         self.alias, info.version, exc, self._current.info.version)
            return None

    def _release_segments(self, held: list[Any]) -> None:
        """Close the segments no held version lists, and let the segment cache evict what no loaded
        version of any process uses (when over its bound)."""
        self.segments.retain(held)
        keys = [key for v in held if isinstance(v, SegmentedLoaded) and is_remote(v.info.artifact_uri)
                for key in self.segment_cache.keys(v.version_manifest, index_uri_of(v.info.artifact_uri))]
        try:
            self.segment_cache.release(keys)  # nothing to do for versions on local disk
        except OSError:
            logger.warning("segment cache: cannot evict under %s", self.segment_cache.root, exc_info=True)

"""Where an index's segments, deletion sets and segmented version manifests live in the artifact store.

Layout: ``ROOT/INDEX/segments/seg-<hex>/``, ``ROOT/INDEX/deletions/<segment>.<hex>.npy`` and
``ROOT/INDEX/VERSION/manifest.json`` (format 3), beside the whole-copy versions of formats 1 and 2.
Segments are written into a local directory (the store itself, or for an object store its copy in
the cache) and, for an object store, uploaded before the version manifest that lists them: the
manifest, written last, is what makes a version exist.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.artifacts import CHUNK_SCHEMA, CHUNKS_FILE, MANIFEST, ArtifactStore, writing_file
from retrieval.segments import files as f
from retrieval.segments.files import SEGMENT_MANIFEST, SEGMENT_NAME
from retrieval.segments.manifest import DELETIONS_DIR, SEGMENTS_DIR, SegmentStore, VersionManifest
from retrieval.segmented import manifest_format, read_version_manifest
from retrieval.segments.cache import fetch_missing, index_uri_of

logger = logging.getLogger(__name__)


class SegmentArtifacts:
    """An index's segments in an artifact store: written locally, uploaded to object stores."""

    def __init__(self, store: ArtifactStore, index: str) -> None:
        self.store = store
        self.index = index
        self.local = SegmentStore(store.index_directory(index))

    def segment_path(self, name: str) -> Path:
        return self.local.segment_path(name)

    def write_version(self, manifest: VersionManifest) -> str:
        """Upload what the version lists that the store lacks, then write its manifest; return its URI.

        A segment another process wrote (a part of a fanned-out build) need not be here: it must be
        in the store.
        """
        missing = [ref.name for ref in manifest.segments
                   if not (self.local.segment_path(ref.name) / SEGMENT_MANIFEST).is_file()]
        if missing and (self.store.is_local or not set(missing) <= self.stored_segments()):
            raise ValueError(f"version {manifest.version} lists segment {missing[0]}, which is neither in "
                             f"{self.local.segments_dir} nor in the store")
        if not self.store.is_local:
            self._upload(manifest)
        with self.store.writing(self.index, manifest.version) as out:
            with writing_file(out / MANIFEST) as path:
                path.write_text(manifest.to_json(), encoding="utf-8")
        return self.store.version_uri(self.index, manifest.version)

    def read_version(self, version: str) -> VersionManifest | None:
        """The segmented manifest of ``version``; None for a whole-copy version.

        Raises:
            VersionCorrupt: the manifest is damaged (named).
        """
        directory = self.store.local_path(self.index, version)
        if manifest_format(directory) != 3:
            return None
        manifest = read_version_manifest(directory, version)
        if not self.store.is_local:
            fetch_missing(manifest, index_uri_of(self.store.version_uri(self.index, version)), self.local.root)
        return manifest

    def chunk_table(self, version: str) -> pa.Table:
        """The version's live chunks (``CHUNK_SCHEMA``) by chunk key, whatever its format."""
        manifest = self.read_version(version)
        if manifest is None:
            table = pq.read_table(self.store.local_path(self.index, version) / CHUNKS_FILE, schema=CHUNK_SCHEMA)
        else:
            parts = []
            for ref in manifest.segments:
                with pa.ipc.open_file(pa.memory_map(str(self.segment_path(ref.name) / f.CHUNKS_FILE), "r")) as reader:
                    chunks = reader.read_all()
                deleted = self.local.read_deletions(ref)
                if len(deleted):
                    chunks = chunks.filter(pc.invert(pc.is_in(chunks.column("chunk_key"), value_set=pa.array(deleted))))
                parts.append(chunks)
            table = pa.concat_tables(parts) if parts else CHUNK_SCHEMA.empty_table()
        return table.sort_by("chunk_key")

    def upload_segment(self, name: str) -> None:
        """Copy the local segment ``name`` to an object store that lacks it (its manifest last: a
        segment without one is incomplete); nothing for a local store."""
        if self.store.is_local:
            return
        from pyarrow import fs

        base = self.store.index_uri(self.index)
        filesystem, root = fs.FileSystem.from_uri(base)
        target = f"{root}/{SEGMENTS_DIR}/{name}"
        if filesystem.get_file_info(f"{target}/{SEGMENT_MANIFEST}").type == fs.FileType.File:
            return
        local = self.local.segment_path(name)
        filesystem.create_dir(target, recursive=True)
        for file in sorted(p.name for p in local.iterdir() if p.name != SEGMENT_MANIFEST) + [SEGMENT_MANIFEST]:
            with writing_file(f"{base}/{SEGMENTS_DIR}/{name}/{file}"):
                fs.copy_files(str(local / file), f"{target}/{file}", destination_filesystem=filesystem)

    def _upload(self, manifest: VersionManifest) -> None:
        from pyarrow import fs

        base = self.store.index_uri(self.index)
        filesystem, root = fs.FileSystem.from_uri(base)
        for ref in manifest.segments:
            if (self.local.segment_path(ref.name) / SEGMENT_MANIFEST).is_file():
                self.upload_segment(ref.name)
            if ref.deletions is not None:
                filesystem.create_dir(f"{root}/{DELETIONS_DIR}", recursive=True)
                with writing_file(f"{base}/{DELETIONS_DIR}/{ref.deletions}"):
                    fs.copy_files(str(self.local.deletions_dir / ref.deletions), f"{root}/{DELETIONS_DIR}/{ref.deletions}",
                                  destination_filesystem=filesystem)

    # -- garbage ------------------------------------------------------------------------------------

    def stored_segments(self) -> set[str]:
        names = set(self.local.segment_names())
        if not self.store.is_local:
            names |= {n for n in self._remote_names(SEGMENTS_DIR) if SEGMENT_NAME.match(n)}
        return names

    def _remote_names(self, folder: str) -> list[str]:
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(self.store.index_uri(self.index))
        try:
            infos = filesystem.get_file_info(fs.FileSelector(f"{root}/{folder}", allow_not_found=True))
        except OSError:
            return []
        return [info.base_name for info in infos]

    def remove_unreferenced(self, manifests: Iterable[VersionManifest]) -> SegmentCollection:
        """Delete the segments and deletion sets none of ``manifests`` lists, and unfinished segment
        writes (call under the index lock, with the manifests of every version that is kept); returns
        what went and the bytes it held in the store."""
        manifests = list(manifests)
        keep = self.local.live_segments(manifests)
        deletions = {ref.deletions for m in manifests for ref in m.segments if ref.deletions}
        removed = sorted(self.stored_segments() - keep)
        size = 0
        for name in removed:
            size += self._remove(f"{SEGMENTS_DIR}/{name}", directory=True)
        if self.local.segments_dir.is_dir():
            for partial in self.local.segments_dir.glob(".*"):  # a killed segment write
                shutil.rmtree(partial, ignore_errors=True)
        stored = {p.name for p in self.local.deletions_dir.glob("*.npy")} if self.local.deletions_dir.is_dir() else set()
        if not self.store.is_local:
            stored |= set(self._remote_names(DELETIONS_DIR))
        doomed = sorted(stored - deletions)
        for name in doomed:
            size += self._remove(f"{DELETIONS_DIR}/{name}", directory=False)
        if removed or doomed:
            logger.info("removed %d segments and %d deletion sets (%d bytes) of index %s no retained version lists",
                        len(removed), len(doomed), size, self.index)
        return SegmentCollection(removed, doomed, size)

    def remove_segments(self, names: Iterable[str]) -> None:
        """Delete segments no version lists (a discarded merge's)."""
        for name in names:
            self._remove(f"{SEGMENTS_DIR}/{self.local.segment_path(name).name}", directory=True)

    def _remove(self, relative: str, *, directory: bool) -> int:
        """Delete a segment or deletion file from the local copy and the object store; returns the
        bytes it held in the store (the object store's for a remote one)."""
        local = self.local.root / relative
        size = stored_bytes(str(local))
        if directory:
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        if not self.store.is_local:
            from pyarrow import fs

            filesystem, root = fs.FileSystem.from_uri(self.store.index_uri(self.index))
            size = stored_bytes(f"{self.store.index_uri(self.index)}/{relative}")
            try:
                (filesystem.delete_dir if directory else filesystem.delete_file)(f"{root}/{relative}")
            except (FileNotFoundError, OSError):
                pass
        return size


@dataclass(frozen=True)
class SegmentCollection:
    """What garbage collection removed of an index's segments: names, deletion files, bytes."""

    segments: list[str]
    deletions: list[str]
    bytes: int


def stored_bytes(uri: str) -> int:
    """The bytes of the file or of every file under the directory at ``uri`` (a path or a pyarrow.fs
    URL); 0 when nothing is there."""
    from pyarrow import fs

    if "://" in uri:
        filesystem, path = fs.FileSystem.from_uri(uri)
    else:
        filesystem, path = fs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            return int(info.size or 0)
        if info.type == fs.FileType.NotFound:
            return 0
        found = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError:
        return 0
    return sum(int(i.size or 0) for i in found if i.type == fs.FileType.File)

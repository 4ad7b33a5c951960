"""A version as a manifest over shared segments, and the store that holds segments, deletion sets and manifests.

Store layout under an index's root: ``segments/seg-<hex>/`` (immutable segments),
``deletions/<segment>.<16 hex>.npy`` (a deletion set: the sorted, unique int64 chunk keys deleted from
one segment, named by its content, so versions whose deletions of a segment are the same share one
file) and ``versions/<version>.json`` (version manifests, written last: a version exists once its
manifest does). Every file is written under a temporary name, fsynced and renamed.

Deletion sets are numpy arrays rather than roaring bitmaps: numpy is already a base dependency, a
sorted array answers membership with one ``searchsorted`` and maps to segment rows the same way,
and at 8 bytes a key a deletion set of 10% of a 1M-chunk segment is 0.8 MB, read once per version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import VersionCorrupt, VersionUnavailable
from retrieval.segments.files import SEGMENT_NAME, check_fields, decode_json_object

VERSION_FORMAT = 3  # 1, 2: whole-copy versions (retrieval.artifacts); 3: a manifest over segments
SEGMENTS_DIR = "segments"
DELETIONS_DIR = "deletions"
VERSIONS_DIR = "versions"


@dataclass(frozen=True)
class SegmentRef:
    """One segment of a version: its name, its rows, and the chunk keys this version deleted from it.

    Attributes:
        deletions: the deletion set's file name under ``deletions/`` (None when nothing is deleted).
        deletions_sha256: the deletion file's SHA-256, checked when it is read.
        ef: the HNSW search breadth validation measured for the segment (the smallest reaching the
            recall target); None: the segment manifest's, else the default.
        recall: the recall@10 against exact search measured at ``ef``.
    """

    name: str
    rows: int
    deleted: int = 0
    deletions: str | None = None
    deletions_sha256: str | None = None
    ef: int | None = None
    recall: float | None = None

    @property
    def live(self) -> int:
        return self.rows - self.deleted


@dataclass(frozen=True)
class VersionManifest:
    """Everything that decides a version's results: its segments and their deletions, the model,
    the metric, the BM25 and HNSW parameters; plus lineage (parent version, run).

    Attributes:
        model_record: the rest of the model lock besides id and dimension (prefixes, the model
            files' fingerprint, an HTTP endpoint, the stored query encoder); the JSON's ``model``
            object holds it with ``id`` and ``dim``, as whole-copy manifests did.
        full_build: whether the version was written without a parent's segments.
    """

    index: str
    version: str
    model_id: str
    dim: int
    metric: str
    analyzer: str
    k1: float
    b: float
    hnsw_m: int
    hnsw_ef_construction: int
    segments: tuple[SegmentRef, ...]
    parent: str | None = None
    run_id: int | None = None
    created_at: str = ""
    chunker_version: str = ""
    model_record: dict[str, Any] = field(default_factory=dict)
    full_build: bool = False
    format: int = VERSION_FORMAT

    @property
    def chunks(self) -> int:
        """Live chunks: the version's chunk count."""
        return sum(s.live for s in self.segments)

    @property
    def deleted(self) -> int:
        return sum(s.deleted for s in self.segments)

    def segment(self, name: str) -> SegmentRef:
        for ref in self.segments:
            if ref.name == name:
                return ref
        raise KeyError(name)

    def child(self, version: str, segments: Sequence[SegmentRef], *, run_id: int | None = None,
              created_at: str = "") -> "VersionManifest":
        """A version with the same model and parameters over ``segments``, this one its parent."""
        return replace(self, version=version, segments=tuple(segments), parent=self.version, run_id=run_id,
                       created_at=created_at)

    @property
    def model(self) -> dict[str, Any]:
        """The model lock as whole-copy manifests record it: ``id``, ``dim`` and the record."""
        return {"id": self.model_id, "dim": self.dim, **self.model_record}

    @property
    def segment_names(self) -> list[str]:
        return [ref.name for ref in self.segments]

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (what the registry records of the version, too)."""
        data = asdict(self)
        data["counts"] = {"chunks": self.chunks, "deleted": self.deleted, "segments": len(self.segments)}
        del data["model_record"]  # written once, inside ``model``
        data["model"] = self.model
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "version manifest") -> "VersionManifest":
        return cls.from_json(json.dumps(data), where)

    @classmethod
    def from_json(cls, text: str, where: str = "version manifest") -> "VersionManifest":
        """Parse and check a version manifest.

        Raises:
            VersionCorrupt: not JSON, a field missing or mistyped, an unknown format, a segment
                listed twice or with impossible counts, or counts that disagree with the segments.
        """
        data = decode_json_object(text, where)
        model = data.get("model")
        if isinstance(model, dict) and "model_record" not in data:
            data = {**data, "model_record": {k: v for k, v in model.items() if k not in ("id", "dim")}}
        values = check_fields(cls, data, where)
        if isinstance(model, dict) and (model.get("id"), model.get("dim")) != (values["model_id"], values["dim"]):
            raise VersionCorrupt(f"{where}: model {model.get('id')!r} of dimension {model.get('dim')!r} disagrees "
                                 f"with model_id {values['model_id']!r}, dim {values['dim']!r}")
        if values["format"] != VERSION_FORMAT:
            raise VersionCorrupt(f"{where}: format {values['format']} is not {VERSION_FORMAT} (segments)")
        refs = []
        for i, item in enumerate(values["segments"]):
            at = f"{where}: segments[{i}]"
            if not isinstance(item, dict):
                raise VersionCorrupt(f"{at} is not an object")
            ref = SegmentRef(**check_fields(SegmentRef, item, at))
            if not SEGMENT_NAME.match(ref.name):
                raise VersionCorrupt(f"{at}: {ref.name!r} is not a segment name")
            if not 0 <= ref.deleted <= ref.rows or (ref.deleted > 0) != (ref.deletions is not None) \
                    or (ref.deletions is None) != (ref.deletions_sha256 is None):
                raise VersionCorrupt(f"{at} ({ref.name}): {ref.deleted} of {ref.rows} rows deleted with deletion "
                                     f"file {ref.deletions!r}")
            refs.append(ref)
        names = [r.name for r in refs]
        if len(set(names)) != len(names):
            raise VersionCorrupt(f"{where}: a segment is listed twice")
        values["segments"] = tuple(refs)
        manifest = cls(**values)
        counts = data.get("counts")
        if counts is not None and counts != {"chunks": manifest.chunks, "deleted": manifest.deleted,
                                             "segments": len(refs)}:
            raise VersionCorrupt(f"{where}: counts {counts} disagree with its segments ({manifest.chunks} live chunks, "
                                 f"{manifest.deleted} deleted, {len(refs)} segments)")
        return manifest


# -- durable files ------------------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename, a new file), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name: fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


class SegmentStore:
    """An index's segments, deletion sets and version manifests under a local directory ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.segments_dir = self.root / SEGMENTS_DIR
        self.deletions_dir = self.root / DELETIONS_DIR
        self.versions_dir = self.root / VERSIONS_DIR

    def segment_path(self, name: str) -> Path:
        if not SEGMENT_NAME.match(name):
            raise ValueError(f"{name!r} is not a segment name")
        return self.segments_dir / name

    def segment_names(self) -> list[str]:
        """The complete segments in the store (temporary directories of unfinished writes excluded)."""
        if not self.segments_dir.is_dir():
            return []
        return sorted(p.name for p in self.segments_dir.iterdir() if SEGMENT_NAME.match(p.name))

    def with_deletions(self, ref: SegmentRef, keys: np.ndarray, segment_keys: np.ndarray) -> SegmentRef:
        """``ref`` with ``keys`` deleted too: the union with its deletion set, written as a new deletion
        file (or found, when a version deleted the same keys before).

        Args:
            segment_keys: the segment's chunk keys ascending (``Segment.sorted_keys``); every key
                deleted must be one of them.

        Raises:
            ValueError: a key is not in the segment (naming it).
        """
        keys = np.unique(np.asarray(keys, dtype=np.int64))
        at = np.searchsorted(segment_keys, keys)
        absent = (at >= len(segment_keys)) | (segment_keys[np.minimum(at, len(segment_keys) - 1)] != keys) \
            if len(segment_keys) else np.ones(len(keys), dtype=bool)
        if absent.any():
            raise ValueError(f"chunk key {int(keys[absent][0])} is not in segment {ref.name}: it cannot be deleted from it")
        merged = np.union1d(self.read_deletions(ref), keys)
        if len(merged) == ref.deleted:
            return ref
        buffer = io.BytesIO()
        np.save(buffer, merged.astype(np.int64), allow_pickle=False)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        name = f"{ref.name}.{digest[:16]}.npy"
        path = self.deletions_dir / name
        if not path.is_file():
            self.deletions_dir.mkdir(parents=True, exist_ok=True)
            write_file_durably(path, data)
        return replace(ref, deleted=len(merged), deletions=name, deletions_sha256=digest)

    def read_deletions(self, ref: SegmentRef) -> np.ndarray:
        """The sorted chunk keys a version deleted from the segment ``ref`` names.

        Raises:
            VersionCorrupt: the deletion file is missing, damaged, or holds another count.
        """
        if ref.deletions is None:
            return np.zeros(0, dtype=np.int64)
        path = self.deletions_dir / ref.deletions
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise VersionCorrupt(f"deletion file {ref.deletions} of segment {ref.name} is missing from "
                                 f"{self.deletions_dir}") from exc
        if hashlib.sha256(data).hexdigest() != ref.deletions_sha256:
            raise VersionCorrupt(f"deletion file {path} does not match its manifest checksum")
        keys = np.load(io.BytesIO(data), allow_pickle=False)
        if keys.dtype != np.int64 or keys.ndim != 1 or len(keys) != ref.deleted or (np.diff(keys) <= 0).any():
            raise VersionCorrupt(f"deletion file {path} holds {keys.shape} {keys.dtype}, not {ref.deleted} sorted keys")
        return keys

    def version_path(self, version: str) -> Path:
        return self.versions_dir / f"{version}.json"

    def write_version(self, manifest: VersionManifest) -> Path:
        """Write the version's manifest (last: the version exists from here on)."""
        for ref in manifest.segments:
            if not (self.segment_path(ref.name) / "segment.json").is_file():
                raise ValueError(f"version {manifest.version} lists segment {ref.name}, which is not in {self.segments_dir}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        path = self.version_path(manifest.version)
        write_file_durably(path, manifest.to_json().encode("utf-8"))
        return path

    def read_version(self, version: str) -> VersionManifest:
        path = self.version_path(version)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise VersionUnavailable(f"version {version}: no manifest at {path}") from exc
        manifest = VersionManifest.from_json(text, f"version {version} ({path})")
        if manifest.version != version:
            raise VersionCorrupt(f"version {version}: its manifest at {path} names version {manifest.version!r}")
        return manifest

    def live_segments(self, manifests: Mapping[str, VersionManifest] | Sequence[VersionManifest]) -> set[str]:
        """The segments some of ``manifests`` list (what garbage collection keeps)."""
        items = manifests.values() if isinstance(manifests, Mapping) else manifests
        return {ref.name for m in items for ref in m.segments}

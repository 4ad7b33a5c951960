"""A segment's files on disk: their names, the segment manifest, and the term hashes postings are keyed by.

A segment is a directory named ``seg-<32 hex>``, written under a temporary name, fsynced and renamed
when complete, and never modified afterwards. Its row order is the order chunks were written: row i
of the vectors, the document lengths, the keys and the chunk table is one chunk. Terms are keyed by
a 64-bit BLAKE2b hash of the analyzed term, sorted, so that a query term is found by binary search
in a memory-mapped array and segments' vocabularies combine without Python dictionaries.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import VersionCorrupt

SEGMENT_FORMAT = 1
SEGMENT_MANIFEST = "segment.json"
SEGMENT_NAME = re.compile(r"^seg-[0-9a-f]{32}$")

KEYS_FILE = "keys.npy"  # int64 [rows]: chunk keys in row order (the HNSW labels)
SORTED_KEYS_FILE = "keys_sorted.npy"  # int64 [rows]: the keys ascending
KEY_ROWS_FILE = "key_rows.npy"  # int64 [rows]: the row of each sorted key
VECTORS_FILE = "vectors.npy"  # float32 [rows, dim]: full-precision vectors, what merges reuse
GRAPH_FILE = "graph.hnsw"  # hnswlib index labelled by chunk keys
CHUNKS_FILE = "chunks.arrow"  # Arrow IPC file, retrieval.artifacts.CHUNK_SCHEMA
DOC_LENGTHS_FILE = "doc_lengths.npy"  # int32 [rows]: analyzed terms per chunk (BM25 length)
TERM_HASHES_FILE = "term_hashes.npy"  # uint64 [terms] ascending
TERMS_FILE = "terms.arrow"  # Arrow IPC file, one string column: the terms in term_hashes order
DF_FILE = "df.npy"  # int32 [terms]: chunks of the segment holding each term
OFFSETS_FILE = "offsets.npy"  # int64 [terms + 1]: postings of term t are [offsets[t], offsets[t+1])
POSTING_ROWS_FILE = "posting_rows.npy"  # int32 [postings]: rows, ascending within a term
POSTING_TFS_FILE = "posting_tfs.npy"  # int32 [postings]: term frequencies

DATA_FILES = (KEYS_FILE, SORTED_KEYS_FILE, KEY_ROWS_FILE, VECTORS_FILE, GRAPH_FILE, CHUNKS_FILE, DOC_LENGTHS_FILE,
              TERM_HASHES_FILE, TERMS_FILE, DF_FILE, OFFSETS_FILE, POSTING_ROWS_FILE, POSTING_TFS_FILE)


def term_hashes(terms: Sequence[str]) -> np.ndarray:
    """The 64-bit keys of analyzed terms (BLAKE2b, little-endian), as uint64."""
    out = np.empty(len(terms), dtype=np.uint64)
    for i, term in enumerate(terms):
        out[i] = int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest(), "little")
    return out


@dataclass(frozen=True)
class FileInfo:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SegmentManifest:
    """What a segment holds and how it was made; ``segment.json``, written last inside the segment.

    Attributes:
        ef_search: the smallest HNSW search breadth whose recall@10 against exact search reached
            ``recall_target`` on a sample of the segment's own vectors (None: not measured).
        recall_at_ef: the recall measured at ``ef_search``.
        total_length: the sum of the chunks' BM25 lengths (collection statistics add these).
        merged_from: the segments a merge wrote this one from (empty for a segment of new chunks).
        exact: the segment has no HNSW graph and is searched exactly (a small segment, see
            ``pipeline.segments.writer``); its files are all the others.
    """

    name: str
    created_at: str
    model_id: str
    dim: int
    metric: str
    analyzer: str
    rows: int
    postings: int
    terms: int
    total_length: int
    min_key: int
    max_key: int
    hnsw_m: int
    hnsw_ef_construction: int
    files: dict[str, FileInfo]
    ef_search: int | None = None
    recall_at_ef: float | None = None
    recall_target: float | None = None
    merged_from: tuple[str, ...] = ()
    exact: bool = False
    format: int = SEGMENT_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "segment manifest") -> "SegmentManifest":
        """Parse and check a manifest.

        Raises:
            VersionCorrupt: not JSON, a field missing or of the wrong type, or an unknown format;
                the message names ``where`` and the field.
        """
        data = decode_json_object(text, where)
        values = check_fields(cls, data, where)
        if values["format"] != SEGMENT_FORMAT:
            raise VersionCorrupt(f"{where}: format {values['format']} is not {SEGMENT_FORMAT}; this library "
                                 f"cannot read it")
        files = {}
        for name, info in values["files"].items():
            if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
                raise VersionCorrupt(f"{where}: files.{name} lacks its size and checksum")
            files[name] = FileInfo(info["bytes"], info["sha256"])
        missing = [n for n in DATA_FILES if n not in files and not (n == GRAPH_FILE and values.get("exact"))]
        if missing:
            raise VersionCorrupt(f"{where}: files lists no {', '.join(missing)}")
        values["files"] = files
        values["merged_from"] = tuple(values["merged_from"])
        return cls(**values)

    def file_table(self) -> dict[str, dict[str, Any]]:
        """The files as :func:`retrieval.artifacts.file_problems` reads them."""
        return {name: {"bytes": info.bytes, "sha256": info.sha256} for name, info in self.files.items()}


def read_segment_manifest(directory: Path) -> SegmentManifest:
    path = directory / SEGMENT_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise VersionCorrupt(f"segment {directory.name}: {SEGMENT_MANIFEST} is missing from {directory}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise VersionCorrupt(f"segment {directory.name}: {path} cannot be read ({exc})") from exc
    manifest = SegmentManifest.from_json(text, f"segment {directory.name} ({path})")
    if manifest.name != directory.name:
        raise VersionCorrupt(f"segment {directory.name}: its manifest names it {manifest.name!r}")
    return manifest


# -- decoding manifests: every field present and of its type, or an error naming it ----------------

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "str": (str,), "float": (int, float), "bool": (bool,),
    "int | None": (int, type(None)), "str | None": (str, type(None)), "float | None": (int, float, type(None)),
}


def decode_json_object(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise VersionCorrupt(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise VersionCorrupt(f"{where} holds a JSON {type(data).__name__}, not an object")
    return data


def check_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The values of the dataclass ``cls``'s fields in ``data``, each checked against its type
    (scalars and optional scalars exactly; containers as JSON lists or objects); defaults fill
    missing optional fields."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise VersionCorrupt(f"{where}: field {f.name!r} is missing")
        value = data[f.name]
        kind = str(f.type)
        allowed = _TYPES.get(kind) or ((list,) if kind.startswith(("tuple", "list")) else (dict,))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise VersionCorrupt(f"{where}: field {f.name!r} is {type(value).__name__} {value!r:.60}, not {kind}")
        values[f.name] = value
    return values

"""Discovery stage: read a source (a directory tree, a JSONL file, object storage) into normalized, hashed documents.

One module per kind of source (``directory``, ``jsonl``, ``objectstore``); what they share lives in
``base`` (the types), ``documents`` (bytes and text into documents) and ``filters`` (globs and the
size limit). Bad input never stops a run and is never silent: each rejected document becomes a
:class:`SkippedDocument` with its reason. Only a source that cannot be read at all raises.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import SourceUnavailable
from pipeline.formats.isolation import ExtractLimits
from pipeline.sources.base import (
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    DEFAULT_MAX_BYTES,
    MAX_DOC_ID_LENGTH,
    MAX_METADATA_DEPTH,
    SkippedDocument,
    SourceDocument,
    SourceScan,
    storable,
    unstorable_field,
)
from pipeline.sources.credentials import ObjectStoreCredentials
from pipeline.sources.directory import scan_directory
from pipeline.sources.documents import document_from_bytes, format_for, make_document, parse_timestamp
from pipeline.sources.filters import SourceFilter
from pipeline.sources.jsonl import scan_jsonl, scan_records
from pipeline.sources.listing import ListingMemory, ListingUpdate
from pipeline.sources.objectstore import is_object_store_uri, root_uri, scan_object_store, source_root

__all__ = [
    "DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "DEFAULT_MAX_BYTES", "MAX_DOC_ID_LENGTH", "MAX_METADATA_DEPTH",
    "ListingMemory", "ListingUpdate", "ObjectStoreCredentials", "SkippedDocument", "SourceDocument", "SourceFilter",
    "SourceScan", "document_from_bytes", "format_for", "is_object_store_uri", "make_document", "parse_timestamp",
    "scan_records", "scan_source", "source_label", "storable", "unstorable_field",
]  # fmt: skip


def source_label(source: str | os.PathLike[str]) -> str:
    """How a run records its source: an object-store URI normalized (its prefix a directory), any
    other source as given.

    Raises:
        ConfigError: an object-store URI holds credentials (refused before anything records it).
    """
    if isinstance(source, str) and is_object_store_uri(source):
        return root_uri(*source_root(source))
    return str(source)


def scan_source(
    source: str | os.PathLike[str],
    *,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    limits: ExtractLimits = ExtractLimits(),
    memory: ListingMemory | None = None,
    credentials: ObjectStoreCredentials | None = None,
) -> SourceScan:
    """Read every document of a source: a directory tree, a ``.jsonl`` file, or an object-store URI.

    PDF, DOCX and HTML files and objects are extracted in a worker process under ``limits``.

    Args:
        memory: for an object store or a directory, the listing the registry recorded: objects
            listed as then, and files whose status is as then, are not read (see
            ``pipeline.sources.listing``). Without it every object and file is read.
        credentials: for an S3 store; default: the standard AWS variables.

    Raises:
        SourceUnavailable: the source does not exist or cannot be read at all (``SourceUnreachable``,
            transient: its store did not answer).
        ConfigError: an object-store URI holds credentials.
    """
    selection = SourceFilter(tuple(include), tuple(exclude), max_bytes)
    if isinstance(source, str) and is_object_store_uri(source):
        return scan_object_store(source, selection, limits, memory, credentials)
    path = Path(source)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise SourceUnavailable(f"source {source} does not exist; nothing was changed") from exc
    except OSError as exc:
        raise SourceUnavailable(f"source {source} cannot be read ({exc.strerror}); nothing was changed") from exc
    if stat.S_ISDIR(st.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise SourceUnavailable(f"source directory {source} is not readable; nothing was changed")
        return scan_directory(path.resolve(), selection, limits, memory)
    if path.suffix.lower() == ".jsonl":
        return scan_jsonl(path, max_bytes)
    raise SourceUnavailable(f"source {source} is neither a directory nor a .jsonl file; nothing was changed")

"""Discovery's read plan (pure): which listed objects or files to read, given what the registry recalls.

An object is read again only when its listing changed (ETag, size or modification time; for a
directory's file, its status: see ``pipeline.sources.directory``), when the
chunker or its format's extractor changed since it was read (its fingerprint), or when the index no
longer holds the document it became. Everything else is counted unchanged without a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

from pipeline.formats import extractor_version
from pipeline.sources.base import SkippedDocument, SourceDocument, SourceScan
from pipeline.sources.documents import extracted_format
from registry.rows import SourceObjectRow
from registry.store import DocumentState


@dataclass(frozen=True)
class ListedObject:
    """One object as the store listed it.

    Attributes:
        doc_id: its key relative to the source's prefix.
        path: what the filesystem opens (``bucket/key``, or a local path).
        uri: the document's source URI.
    """

    doc_id: str
    path: str
    uri: str
    size: int
    etag: str | None
    mtime: datetime | None


@dataclass(frozen=True)
class ListingMemory:
    """What a run knows before it lists: the recorded listing of a source URI, the registry's
    documents, and the chunker configuration of this run."""

    recorded: Callable[[str], Mapping[str, SourceObjectRow]]
    known: Mapping[str, DocumentState]
    chunker_version: str


@dataclass(frozen=True)
class ReadPlan:
    """The listed objects to read; the doc_ids left unread (unchanged); recorded skips, repeated."""

    read: list[ListedObject]
    unread: list[str]
    skipped: list[SkippedDocument]


@dataclass
class ListingUpdate:
    """What the registry records of a listing once the run that read it succeeded: the objects read
    (as rows) and the doc_ids no longer listed."""

    source: str
    record: list[SourceObjectRow] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rows = [{**asdict(r), "mtime": r.mtime.isoformat() if r.mtime else None} for r in self.record]
        return {"source": self.source, "record": rows, "forget": list(self.forget)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ListingUpdate":
        rows = [SourceObjectRow(**{**r, "mtime": datetime.fromisoformat(r["mtime"]) if r["mtime"] else None})
                for r in data["record"]]
        return cls(source=data["source"], record=rows, forget=list(data["forget"]))


@lru_cache(maxsize=8)
def _extractor(fmt: str) -> str:
    return extractor_version(fmt)


def fingerprint(chunker_version: str, doc_id: str) -> str:
    """What decides an object's document besides its bytes: the chunker configuration and, for a
    PDF, DOCX or HTML object, its extractor's version."""
    fmt = extracted_format(doc_id)
    return f"{chunker_version};extractor={_extractor(fmt)}" if fmt else chunker_version


def same_listing(obj: ListedObject, row: SourceObjectRow) -> bool:
    """Whether the store lists ``obj`` exactly as when ``row`` was recorded."""
    return obj.etag == row.etag and obj.size == row.size and obj.mtime == row.mtime


def plan_reads(
    listed: Iterable[ListedObject], recorded: Mapping[str, SourceObjectRow], known: Mapping[str, DocumentState],
    chunker_version: str,
) -> ReadPlan:
    """Partition ``listed``: each object is read, left unread (its indexed document stands), or
    skipped again for the reason recorded when its unchanged content was read."""
    read: list[ListedObject] = []
    unread: list[str] = []
    skipped: list[SkippedDocument] = []
    for obj in listed:
        row = recorded.get(obj.doc_id)
        if row is None or not same_listing(obj, row) or row.fingerprint != fingerprint(chunker_version, obj.doc_id):
            read.append(obj)
        elif row.skip_reason is not None:
            skipped.append(SkippedDocument(obj.doc_id, row.skip_reason, gone=row.skip_gone))
        elif _indexed_as(known.get(obj.doc_id), row.content_hash):
            unread.append(obj.doc_id)
        else:
            read.append(obj)  # the index lost or replaced its document (a delete, a failed run): read it
    return ReadPlan(read, unread, skipped)


def _indexed_as(state: DocumentState | None, content_hash: str | None) -> bool:
    return state is not None and state.status == "active" and state.content_hash == content_hash


def record_of(obj: ListedObject, chunker_version: str, result: SourceDocument | SkippedDocument) -> SourceObjectRow:
    """The row that remembers what ``obj``, as listed, became."""
    common = {"doc_id": obj.doc_id, "etag": obj.etag, "size": obj.size, "mtime": obj.mtime,
              "fingerprint": fingerprint(chunker_version, obj.doc_id)}
    if isinstance(result, SourceDocument):
        return SourceObjectRow(**common, content_hash=result.content_hash, skip_reason=None, skip_gone=False)
    return SourceObjectRow(**common, content_hash=None, skip_reason=result.reason, skip_gone=result.gone)


def planned_scan(label: str, what: str, listed: int, plan: ReadPlan, documents: list[SourceDocument],
                 skipped: list[SkippedDocument], update: ListingUpdate | None) -> SourceScan:
    """The scan of a source read after ``plan``: what was read, skipped (now or, unread, as recorded)
    and left unread, each sorted by doc_id; ``update`` is what to record once the run succeeded."""
    logger.info("source %s: %d %s listed, %d read, %d unchanged", label, listed, what, len(plan.read),
                len(plan.unread))
    return SourceScan(source=label, documents=sorted(documents, key=lambda d: d.doc_id),
                      skipped=sorted([*skipped, *plan.skipped], key=lambda s: s.doc_id), unread=sorted(plan.unread),
                      listing=update)

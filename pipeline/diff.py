"""Diff stage: compare the documents a source holds now with what the registry knows (a pure function)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from pipeline.chunking import chunk_context
from pipeline.code import code_chunker_version
from pipeline.hashing import sha256_hex
from pipeline.sources import SkippedDocument, SourceDocument, SourceScan
from registry.store import DocumentState


@dataclass(frozen=True)
class ChangeSet:
    """The plan of one run: every incoming document lands in exactly one of the first five lists.

    Attributes:
        new: not in the registry, or deleted there earlier (chunk and embed).
        changed: text changed, or cut by another chunker configuration, format or title (re-chunk,
            embed cache misses).
        metadata_only: same text, other metadata or source uri (update the registry row only).
        unchanged: nothing to do.
        deleted: doc_ids active in the registry but gone from the source.
        kept: doc_ids active in the registry that the source holds but could not be read this run,
            or that lie in a directory it could not list; their indexed version stays (see
            ``SkippedDocument.gone`` and ``SkippedDocument.under``).
    """

    new: tuple[SourceDocument, ...]
    changed: tuple[SourceDocument, ...]
    metadata_only: tuple[SourceDocument, ...]
    unchanged: tuple[str, ...]
    deleted: tuple[str, ...]
    kept: tuple[str, ...] = ()

    @property
    def to_chunk(self) -> tuple[SourceDocument, ...]:
        return self.new + self.changed

    @property
    def to_write(self) -> tuple[SourceDocument, ...]:
        return self.new + self.changed + self.metadata_only

    @property
    def is_empty(self) -> bool:
        return not (self.new or self.changed or self.metadata_only or self.deleted)


def document_chunker(chunker_version: str, doc: SourceDocument) -> str:
    """What decides one document's chunks besides its text: the chunker configuration, the document's
    format, the title its chunks are indexed with (see ``pipeline.chunking``), for a PDF, DOCX or
    HTML file its extractor's version and the digest of the pages and headings it found — so an
    upgraded extractor re-chunks exactly the documents of its format — and, for source code, the
    versions of the grammar that parses it (see ``pipeline.code``)."""
    context = chunk_context(doc.metadata)
    title = f";title={sha256_hex(context)[:16]}" if context else ""
    extraction = f";extractor={doc.extraction}" if doc.extraction else ""
    return f"{chunker_version};format={doc.format}{code_chunker_version(doc.format)}{title}{extraction}"


def plan_changes(
    known: Mapping[str, DocumentState],
    incoming: Iterable[SourceDocument],
    chunker_version: str,
    unreadable: Iterable[str] = (),
    unreadable_under: Iterable[str] = (),
    unread: Iterable[str] = (),
) -> ChangeSet:
    """Partition ``incoming`` against ``known`` (the registry's document states).

    Args:
        known: the registry's documents of this index by doc_id (active and deleted).
        incoming: every document the source holds now (doc_ids unique).
        chunker_version: the current chunker configuration; a document cut by another one, or in
            another format, is changed.
        unreadable: doc_ids the source holds but could not be read this run (kept as indexed).
        unreadable_under: doc_id prefixes of directories the source could not list ("" for all):
            the indexed documents under them are kept, since nothing says they are gone.
        unread: doc_ids the source holds but did not read, because it lists them exactly as when
            their active, indexed version was read (an object store): unchanged.

    Returns:
        The change set; doc_ids of each list keep the order of ``incoming``.
    """
    new: list[SourceDocument] = []
    changed: list[SourceDocument] = []
    metadata_only: list[SourceDocument] = []
    unchanged: list[str] = []
    seen: set[str] = set()
    for doc in incoming:
        if doc.doc_id in seen:
            raise ValueError(f"document {doc.doc_id!r} appears twice in one source scan")
        seen.add(doc.doc_id)
        state = known.get(doc.doc_id)
        if state is None or state.status != "active":
            new.append(doc)
        elif state.content_hash != doc.content_hash or state.chunker_version != document_chunker(chunker_version, doc):
            changed.append(doc)
        elif state.metadata_hash != doc.metadata_hash:
            metadata_only.append(doc)
        else:
            unchanged.append(doc.doc_id)
    for doc_id in unread:
        if doc_id in seen:
            raise ValueError(f"document {doc_id!r} appears twice in one source scan")
        seen.add(doc_id)
        unchanged.append(doc_id)
    held = set(unreadable) - seen
    prefixes = tuple(unreadable_under)
    if prefixes:
        held |= {d for d in known if d not in seen and d.startswith(prefixes)}
    kept = sorted(d for d in held if d in known and known[d].status == "active")
    deleted = sorted(
        doc_id for doc_id, state in known.items() if state.status == "active" and doc_id not in seen and doc_id not in held
    )
    return ChangeSet(tuple(new), tuple(changed), tuple(metadata_only), tuple(unchanged), tuple(deleted), tuple(kept))


def partial_scan(scan: SourceScan, known: Mapping[str, DocumentState], delete: Iterable[str], index: str) -> SourceScan:
    """A scan of only some documents (an upsert batch, a list of doc_ids to delete) as the diff takes it:
    the index's other active documents are listed as unread (they stay as they are), the doc_ids to
    delete are left out (so the diff deletes them), and each doc_id to delete that the index does not
    hold, is listed twice or is also upserted is skipped with its reason."""
    skipped = list(scan.skipped)
    upserted = {d.doc_id for d in scan.documents}
    doomed: set[str] = set()
    for doc_id in delete:
        state = known.get(doc_id)
        if doc_id in doomed:
            skipped.append(SkippedDocument(doc_id, "listed twice for deletion"))
        elif doc_id in upserted:
            skipped.append(SkippedDocument(doc_id, "both upserted and deleted in one batch; upserted"))
        elif state is None or state.status != "active":
            skipped.append(SkippedDocument(doc_id, f"not a document of index {index!r}; nothing to delete"))
        else:
            doomed.add(doc_id)
    unread = sorted(d for d, s in known.items() if s.status == "active" and d not in upserted and d not in doomed)
    return replace(scan, skipped=skipped, unread=unread)

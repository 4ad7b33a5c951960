"""Discovery's document making: bytes or text of one document into a normalized, hashed document.

Every kind of source ends here: a directory's files and an object store's objects through
:func:`document_from_bytes` (PDF, DOCX and HTML extracted in the isolated worker), JSONL records
and in-memory records through :func:`make_document`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from pipeline.code import CODE_EXTENSIONS
from pipeline.formats import EXTRACTED_FORMATS, Extracted, Unextractable, extract_document
from pipeline.formats.isolation import IsolatedExtractor
from pipeline.hashing import content_hash, metadata_hash, normalize_text, sha256_hex
from pipeline.sources.base import MAX_DOC_ID_LENGTH, SkippedDocument, SourceDocument, unstorable_field

_FORMATS = {
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".rst": "rst", ".py": "python", ".pyi": "python", ".html": "html", ".htm": "html",
    **CODE_EXTENSIONS,
}  # fmt: skip


def format_for(doc_id: str, metadata: dict[str, Any] | None = None) -> str:
    """Pick the chunking format from metadata['format'] or the doc_id's extension."""
    if metadata and isinstance(metadata.get("format"), str):
        return metadata["format"]
    return _FORMATS.get(os.path.splitext(doc_id)[1].lower(), "text")


def extracted_format(name: str) -> str | None:
    """The extractor format of a file or object name (``pdf``, ``docx``, ``html``), or None for text."""
    return EXTRACTED_FORMATS.get(os.path.splitext(name)[1].lower())


def document_from_bytes(
    doc_id: str, data: bytes, uri: str, extractor: IsolatedExtractor
) -> SourceDocument | SkippedDocument:
    """One file's or object's bytes as a document: PDF, DOCX and HTML through ``extractor``, any
    other name as UTF-8 text; or why it cannot be indexed."""
    fmt = extracted_format(doc_id)
    if fmt is not None:
        extracted = extractor.extract(fmt, data)
        if isinstance(extracted, str):
            return SkippedDocument(doc_id, extracted)
        return make_document(doc_id, extracted.text, uri, extracted=extracted, fmt=fmt)
    if b"\x00" in data[:8192]:
        return SkippedDocument(doc_id, "binary file (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SkippedDocument(doc_id, f"not valid UTF-8 text (byte {exc.start})")
    return make_document(doc_id, text, uri)


def make_document(
    doc_id: str, raw_text: str, source_uri: str, metadata: dict[str, Any] | None = None,
    *, extracted: Extracted | None = None, fmt: str | None = None,
) -> SourceDocument | SkippedDocument:
    """Normalize and hash one document, or say why it cannot be indexed.

    ``extracted`` is what an extractor made of a PDF, DOCX or HTML file (of format ``fmt``): its
    text is indexed as it is, and its title becomes ``metadata["title"]`` unless one is given.
    """
    metadata = dict(metadata or {})
    if not doc_id or len(doc_id) > MAX_DOC_ID_LENGTH:
        return SkippedDocument(doc_id[:80], f"invalid doc_id (empty or over {MAX_DOC_ID_LENGTH} characters)")
    problem = unstorable_field(doc_id, raw_text, metadata)
    if problem:
        return SkippedDocument(doc_id, problem)
    valid_from = None
    if metadata.get("valid_from") is not None:
        valid_from = parse_timestamp(metadata["valid_from"])
        if valid_from is None:
            return SkippedDocument(doc_id, f"metadata.valid_from {metadata['valid_from']!r} is not an ISO 8601 timestamp")
    fmt = fmt or format_for(doc_id, metadata)
    if extracted is None and fmt == "html":
        try:  # an HTML record of a JSONL source: text, extracted in this process
            extracted = extract_document(fmt, raw_text.encode("utf-8"))
        except Unextractable as exc:
            return SkippedDocument(doc_id, str(exc), gone=True)
    layout, extraction = None, ""
    if extracted is not None:
        text, layout = extracted.text, extracted.layout
        extraction = f"{extracted.extractor};layout={sha256_hex(json.dumps(layout.to_json()))[:16]}"
        if extracted.title and "title" not in metadata:
            metadata["title"] = extracted.title
    else:
        text = normalize_text(raw_text)
    if not text.strip():
        return SkippedDocument(doc_id, "empty document", gone=True)
    return SourceDocument(
        doc_id=doc_id,
        text=text,
        source_uri=source_uri,
        format=fmt,
        metadata=metadata,
        content_hash=content_hash(text),
        metadata_hash=metadata_hash(metadata, source_uri),
        valid_from=valid_from,
        layout=layout,
        extraction=extraction,
    )


def parse_timestamp(value: object) -> datetime | None:
    """An ISO 8601 timestamp as an aware datetime (naive ones are UTC), or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

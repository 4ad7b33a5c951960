"""Discovery from records: a JSONL file of {"doc_id", "text", "metadata"} lines, or records in memory."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import SourceUnavailable
from pipeline.sources.base import SkippedDocument, SourceDocument, SourceScan
from pipeline.sources.documents import make_document


def scan_jsonl(path: Path, max_bytes: int) -> SourceScan:
    """Read every record of a JSONL file; a bad line is skipped with its line number and reason.

    Raises:
        SourceUnavailable: the file cannot be opened or is not a regular file.
    """
    name = path.name
    try:
        # non-blocking: opening a FIFO would wait for a writer, and the run holds the index lock
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except OSError as exc:
        raise SourceUnavailable(f"source {path} cannot be read ({exc.strerror}); nothing was changed") from exc
    with fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise SourceUnavailable(f"source {path} is not a regular file; nothing was changed")
        path = path.resolve()
        return scan_jsonl_lines(fh, name, path.as_uri(), max_bytes)


def scan_jsonl_lines(lines: Iterable[bytes], name: str, uri: str, max_bytes: int) -> SourceScan:
    """Read JSONL records from ``lines`` (a file, or standard input); a bad line is skipped with its
    line number and reason: malformed JSON, a missing field, a duplicate doc_id, a record over
    ``max_bytes``. Documents without a ``metadata.source_uri`` get ``URI#DOC_ID``."""
    documents: list[SourceDocument] = []
    skipped: list[SkippedDocument] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        record = _parse_jsonl_line(raw, max_bytes)
        if isinstance(record, str):
            skipped.append(SkippedDocument(where, f"line {lineno}: {record}"))
            continue
        doc_id, text, metadata = record
        if doc_id in first_line:
            skipped.append(
                SkippedDocument(doc_id, f"line {lineno}: duplicate doc_id (first at line {first_line[doc_id]})")
            )
            continue
        first_line[doc_id] = lineno
        source_uri = metadata.get("source_uri") if isinstance(metadata.get("source_uri"), str) else None
        result = make_document(doc_id, text, source_uri or f"{uri}#{doc_id}", metadata)
        if isinstance(result, SkippedDocument):
            result = SkippedDocument(result.doc_id, f"line {lineno}: {result.reason}", result.gone)
            skipped.append(result)
        else:
            documents.append(result)
    documents.sort(key=lambda d: d.doc_id)
    return SourceScan(source=uri, documents=documents, skipped=skipped)


def _parse_jsonl_line(raw: bytes, max_bytes: int) -> tuple[str, str, dict[str, Any]] | str:
    """Return (doc_id, text, metadata) or the reason the line is rejected."""
    if len(raw) > max_bytes + 1024:
        return f"record larger than the {max_bytes}-byte limit"
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"malformed JSON ({exc})"
    except RecursionError:
        return "malformed JSON (nested too deeply)"
    if not isinstance(record, dict):
        return "not a JSON object"
    doc_id, text, metadata = record.get("doc_id"), record.get("text"), record.get("metadata", {})
    if not isinstance(doc_id, str) or not doc_id:
        return "missing or non-string doc_id"
    if not isinstance(text, str):
        return f"doc_id {doc_id!r}: missing or non-string text"
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        return f"doc_id {doc_id!r}: metadata is not an object"
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:  # a lone surrogate is rejected later, by name
        return f"doc_id {doc_id!r}: text larger than the {max_bytes}-byte limit"
    return doc_id, text, metadata


def scan_records(records: Iterable[tuple[str, str, dict[str, Any]]], source: str) -> SourceScan:
    """Build a scan from in-memory (doc_id, text, metadata) records, e.g. a replayed history."""
    documents: list[SourceDocument] = []
    skipped: list[SkippedDocument] = []
    for doc_id, text, metadata in records:
        result = make_document(doc_id, text, f"{source}#{doc_id}", metadata)
        (documents if isinstance(result, SourceDocument) else skipped).append(result)  # type: ignore[arg-type]
    documents.sort(key=lambda d: d.doc_id)
    return SourceScan(source=source, documents=documents, skipped=skipped)

"""Discovery stage: read source documents (a directory tree or JSONL) into normalized, hashed documents.

Bad input never stops a run and is never silent: each rejected document becomes a
:class:`SkippedDocument` with its reason. Only a source that cannot be read at all raises.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

from pipeline.codechunks import CODE_EXTENSIONS
from pipeline.errors import SourceUnavailable
from pipeline.hashing import content_hash, metadata_hash, normalize_text

DEFAULT_INCLUDE = (
    "*.md", "*.markdown", "*.mdx", "*.rst", "*.txt", "*.text", "*.html", "*.htm",
    "*.py", "*.pyi", "*.adoc", "*.tex", "*.org",
    "*.js", "*.mjs", "*.cjs", "*.jsx", "*.ts", "*.tsx", "*.go", "*.rs", "*.java",
)  # fmt: skip
# hidden files and directories; installed JavaScript packages (node_modules) are not the project's source
DEFAULT_EXCLUDE = (".*", "*/.*", "node_modules", "*/node_modules")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_DOC_ID_LENGTH = 1024

_FORMATS = {
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".rst": "rst", ".py": "python", ".pyi": "python", ".html": "html", ".htm": "html",
    **CODE_EXTENSIONS,
}  # fmt: skip


@dataclass(frozen=True)
class SourceDocument:
    """One document as ragpipe sees it: normalized text plus its hashes.

    ``text`` is the normalized text (HTML is reduced to its text with headings kept); chunk
    offsets index it.
    """

    doc_id: str
    text: str
    source_uri: str
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    metadata_hash: str = ""
    valid_from: datetime | None = None  # from metadata["valid_from"]: hidden from retrieval before then


@dataclass(frozen=True)
class SkippedDocument:
    """A document the source holds but this run cannot index.

    ``gone`` is true when the document has no content any more (it is then deleted from the index
    like a removed file); otherwise an already indexed version of it is kept, so that a transient
    failure or a bad edit never removes what readers are served.
    """

    doc_id: str
    reason: str
    gone: bool = False

    def to_dict(self) -> dict[str, str]:
        return {"doc_id": self.doc_id, "reason": self.reason}


@dataclass
class SourceScan:
    """Everything one discovery pass found."""

    source: str
    documents: list[SourceDocument]
    skipped: list[SkippedDocument]


def format_for(doc_id: str, metadata: dict[str, Any] | None = None) -> str:
    """Pick the chunking format from metadata['format'] or the doc_id's extension."""
    if metadata and isinstance(metadata.get("format"), str):
        return metadata["format"]
    return _FORMATS.get(os.path.splitext(doc_id)[1].lower(), "text")


def make_document(
    doc_id: str, raw_text: str, source_uri: str, metadata: dict[str, Any] | None = None
) -> SourceDocument | SkippedDocument:
    """Normalize and hash one document, or say why it cannot be indexed."""
    metadata = dict(metadata or {})
    if not doc_id or len(doc_id) > MAX_DOC_ID_LENGTH or "\x00" in doc_id:
        return SkippedDocument(doc_id[:80], "invalid doc_id (empty, longer than 1024 characters or with NUL)")
    valid_from = None
    if metadata.get("valid_from") is not None:
        valid_from = parse_timestamp(metadata["valid_from"])
        if valid_from is None:
            return SkippedDocument(doc_id, f"metadata.valid_from {metadata['valid_from']!r} is not an ISO 8601 timestamp")
    fmt = format_for(doc_id, metadata)
    if fmt == "html":
        raw_text = html_to_text(raw_text)
        fmt = "markdown"
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


def scan_source(
    source: str | os.PathLike[str],
    *,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SourceScan:
    """Read every document of a source: a directory tree or a ``.jsonl`` file.

    Raises:
        SourceUnavailable: the source does not exist or cannot be read at all.
    """
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
        return _scan_directory(path.resolve(), tuple(include), tuple(exclude), max_bytes)
    if path.suffix.lower() == ".jsonl":
        return _scan_jsonl(path.resolve(), max_bytes)
    raise SourceUnavailable(f"source {source} is neither a directory nor a .jsonl file; nothing was changed")


def _scan_directory(root: Path, include: tuple[str, ...], exclude: tuple[str, ...], max_bytes: int) -> SourceScan:
    skipped: list[SkippedDocument] = []
    wanted = _compile(include)
    files = [(rel, entry) for rel, entry in _walk(root, _compile(exclude), skipped) if wanted(rel)]
    uri_prefix = root.as_uri().rstrip("/") + "/"

    def read_slice(part: list[tuple[str, os.DirEntry[str]]]) -> list[SourceDocument | SkippedDocument]:
        return [_read_file(uri_prefix, rel, entry, max_bytes) for rel, entry in part]

    results = read_slice(files)
    documents = sorted((r for r in results if isinstance(r, SourceDocument)), key=lambda d: d.doc_id)
    skipped.extend(sorted((r for r in results if isinstance(r, SkippedDocument)), key=lambda d: d.doc_id))
    return SourceScan(source=root.as_uri(), documents=documents, skipped=skipped)


def _compile(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """One regular expression for a list of globs (``*`` also crosses ``/``)."""
    if not patterns:
        return lambda rel: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda rel: regex.match(rel) is not None


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root + os.sep)


def _walk(
    root: Path, excluded: Callable[[str], bool], skipped: list[SkippedDocument]
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield (relative posix path, entry) for files under root; symlinks may not leave it."""
    root_str = str(root)
    visited = {root_str}
    stack: list[tuple[str, str]] = [(root_str, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedDocument(prefix or ".", f"directory unreadable: {exc.strerror}"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            if excluded(rel):
                continue
            try:
                is_link = entry.is_symlink()
                if is_link:
                    real = os.path.realpath(entry.path)
                    if not _inside(root_str, real):
                        skipped.append(SkippedDocument(rel, "symlink leaves the source root"))
                        continue
                if entry.is_dir(follow_symlinks=True):
                    real = os.path.realpath(entry.path) if is_link else entry.path
                    if real in visited:
                        continue  # a link back into the tree; already walked
                    visited.add(real)
                    stack.append((entry.path, rel + "/"))
                elif entry.is_file(follow_symlinks=True):
                    yield rel, entry
            except OSError as exc:
                skipped.append(SkippedDocument(rel, f"unreadable: {exc.strerror}"))


def _read_at_most(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        remaining = limit
        while remaining > 0:
            part = os.read(fd, remaining)
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def _read_file(uri_prefix: str, rel: str, entry: os.DirEntry[str], max_bytes: int) -> SourceDocument | SkippedDocument:
    try:
        size = entry.stat(follow_symlinks=True).st_size
        if size > max_bytes:
            return SkippedDocument(rel, f"larger than the {max_bytes}-byte limit ({size} bytes)")
        data = _read_at_most(entry.path, size + 1)  # sized by stat: no 10 MiB buffer for a 1 KiB file
    except OSError as exc:
        return SkippedDocument(rel, f"unreadable: {exc.strerror}")
    if len(data) > size:
        return SkippedDocument(rel, "changed while being read; the next run will pick it up")
    if b"\x00" in data[:8192]:
        return SkippedDocument(rel, "binary file (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SkippedDocument(rel, f"not valid UTF-8 text (byte {exc.start})")
    return make_document(rel, text, uri_prefix + quote_from_bytes(os.fsencode(rel)))


def _scan_jsonl(path: Path, max_bytes: int) -> SourceScan:
    documents: list[SourceDocument] = []
    skipped: list[SkippedDocument] = []
    first_line: dict[str, int] = {}
    name = path.name
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SourceUnavailable(f"source {path} cannot be read ({exc.strerror}); nothing was changed") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
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
            uri = metadata.get("source_uri") if isinstance(metadata.get("source_uri"), str) else None
            result = make_document(doc_id, text, uri or f"{path.as_uri()}#{doc_id}", metadata)
            if isinstance(result, SkippedDocument):
                result = SkippedDocument(result.doc_id, f"line {lineno}: {result.reason}", result.gone)
                skipped.append(result)
            else:
                documents.append(result)
    documents.sort(key=lambda d: d.doc_id)
    return SourceScan(source=path.as_uri(), documents=documents, skipped=skipped)


def _parse_jsonl_line(raw: bytes, max_bytes: int) -> tuple[str, str, dict[str, Any]] | str:
    """Return (doc_id, text, metadata) or the reason the line is rejected."""
    if len(raw) > max_bytes + 1024:
        return f"record larger than the {max_bytes}-byte limit"
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"malformed JSON ({exc})"
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
    if len(text.encode("utf-8")) > max_bytes:
        return f"doc_id {doc_id!r}: text larger than the {max_bytes}-byte limit"
    return doc_id, text, metadata


class _HTMLText(HTMLParser):
    """Reduce HTML to text: headings become Markdown headings, block elements paragraph breaks."""

    _BLOCK = {"p", "div", "section", "article", "li", "ul", "ol", "table", "tr", "blockquote", "br", "hr",
              "pre", "dd", "dt", "header", "footer", "main", "nav", "aside", "figure", "figcaption"}  # fmt: skip
    _SKIP = {"script", "style", "head", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip_depth += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")
            if tag == "pre":
                self.pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif (len(tag) == 2 and tag[0] == "h" and tag[1] in "123456") or tag in self._BLOCK:
            self.parts.append("\n\n")
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:
            self.parts.append(data)
        else:
            self.parts.append(" ".join(data.split()) + (" " if data[-1:].isspace() else ""))


def html_to_text(html: str) -> str:
    """Return the readable text of an HTML page, headings kept as ``#`` lines."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = [line.strip() if not line.startswith("    ") else line.rstrip() for line in "".join(parser.parts).split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


def scan_records(records: Iterable[tuple[str, str, dict[str, Any]]], source: str) -> SourceScan:
    """Build a scan from in-memory (doc_id, text, metadata) records, e.g. a replayed history."""
    documents: list[SourceDocument] = []
    skipped: list[SkippedDocument] = []
    for doc_id, text, metadata in records:
        result = make_document(doc_id, text, f"{source}#{doc_id}", metadata)
        (documents if isinstance(result, SourceDocument) else skipped).append(result)  # type: ignore[arg-type]
    documents.sort(key=lambda d: d.doc_id)
    return SourceScan(source=source, documents=documents, skipped=skipped)

"""Discovery stage: read source documents (a directory tree or JSONL) into normalized, hashed documents.

Bad input never stops a run and is never silent: each rejected document becomes a
:class:`SkippedDocument` with its reason. Only a source that cannot be read at all raises.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

from pipeline.codechunks import CODE_EXTENSIONS
from pipeline.errors import SourceUnavailable
from pipeline.formats import EXTRACTED_FORMATS, Extracted, Layout, Unextractable, extract_document
from pipeline.formats.isolation import ExtractLimits, IsolatedExtractor
from pipeline.hashing import content_hash, metadata_hash, normalize_text, sha256_hex

DEFAULT_INCLUDE = (
    "*.md", "*.markdown", "*.mdx", "*.rst", "*.txt", "*.text", "*.html", "*.htm",
    "*.py", "*.pyi", "*.adoc", "*.tex", "*.org", "*.pdf", "*.docx",
    "*.js", "*.mjs", "*.cjs", "*.jsx", "*.ts", "*.tsx", "*.go", "*.rs", "*.java",
)  # fmt: skip
# hidden files and directories; installed JavaScript packages (node_modules) are not the project's source
DEFAULT_EXCLUDE = (".*", "*/.*", "node_modules", "*/node_modules")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_DOC_ID_LENGTH = 1024
MAX_METADATA_DEPTH = 64  # deeper objects are refused: hashing and storing them would need deep recursion
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")  # NUL and lone surrogates: PostgreSQL text cannot hold them

_FORMATS = {
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".rst": "rst", ".py": "python", ".pyi": "python", ".html": "html", ".htm": "html",
    **CODE_EXTENSIONS,
}  # fmt: skip


@dataclass(frozen=True)
class SourceDocument:
    """One document as ragpipe sees it: normalized text plus its hashes.

    ``text`` is the normalized text (PDF, DOCX and HTML: the text their extractor found); chunk
    offsets index it. ``layout`` holds an extracted document's page and heading spans over ``text``;
    ``extraction`` names its extractor version and a digest of the layout (part of the document's
    chunker configuration, see ``pipeline.diff.document_chunker``).
    """

    doc_id: str
    text: str
    source_uri: str
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    metadata_hash: str = ""
    valid_from: datetime | None = None  # from metadata["valid_from"]: hidden from retrieval before then
    layout: Layout | None = None
    extraction: str = ""


@dataclass(frozen=True)
class SkippedDocument:
    """A document the source holds but this run cannot index.

    ``gone`` is true when the document has no content any more (it is then deleted from the index
    like a removed file); otherwise an already indexed version of it is kept, so that a transient
    failure or a bad edit never removes what readers are served. ``under`` is set for a directory
    that could not be listed (its doc_id prefix, "" for the root): every indexed document below it
    is kept.
    """

    doc_id: str
    reason: str
    gone: bool = False
    under: str | None = None

    def to_dict(self) -> dict[str, str]:
        """The skip as recorded in ``runs.skipped`` and printed: characters PostgreSQL cannot store
        are written as Python escapes (a NUL as ``\\x00``)."""
        return {"doc_id": storable(self.doc_id), "reason": storable(self.reason)}


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates written as backslash escapes, so PostgreSQL can store it."""
    return _UNSTORABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def unstorable_field(doc_id: str, text: str, metadata: dict[str, Any]) -> str | None:
    """Why PostgreSQL cannot store this document (the field, the character and its position), or None.

    Checked before anything is written: text columns cannot hold NUL, UTF-8 cannot encode a lone
    surrogate (JSON allows ``"\\udc80"``; Python decodes a file name that is not UTF-8 into one),
    and PostgreSQL's JSON has no NaN or infinity.
    """
    for field, value in (("doc_id", doc_id), ("text", text)):
        problem = _unstorable_string(field, value)
        if problem:
            return problem
    stack: list[tuple[str, Any, int]] = [("metadata", metadata, 1)]
    while stack:  # iterative: metadata may be nested as deep as the JSON parser allows
        path, value, depth = stack.pop()
        problem = _unstorable_value(path, value, depth)
        if problem:
            return problem
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}", v, depth + 1) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(value))))
    return None


def _unstorable_value(path: str, value: Any, depth: int) -> str | None:
    if isinstance(value, str):
        return _unstorable_string(path, value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value!r}, which PostgreSQL's JSON cannot store"
    if isinstance(value, (dict, list)) and depth > MAX_METADATA_DEPTH:
        return f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels"
    if isinstance(value, dict):
        for key in value:
            problem = _unstorable_string(f"key {key!r} of {path}", key) if isinstance(key, str) else None
            if problem:
                return problem
    return None


def _unstorable_string(field: str, value: str) -> str | None:
    m = _UNSTORABLE.search(value)
    if m is None:
        return None
    char = m.group()
    what = "a NUL character" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return f"{field} holds {what} at character {m.start()}, which PostgreSQL cannot store"


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


def scan_source(
    source: str | os.PathLike[str],
    *,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    limits: ExtractLimits = ExtractLimits(),
) -> SourceScan:
    """Read every document of a source: a directory tree or a ``.jsonl`` file.

    PDF, DOCX and HTML files are extracted in a worker process under ``limits``.

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
        return _scan_directory(path.resolve(), tuple(include), tuple(exclude), max_bytes, limits)
    if path.suffix.lower() == ".jsonl":
        return _scan_jsonl(path, max_bytes)
    raise SourceUnavailable(f"source {source} is neither a directory nor a .jsonl file; nothing was changed")


def _scan_directory(
    root: Path, include: tuple[str, ...], exclude: tuple[str, ...], max_bytes: int, limits: ExtractLimits
) -> SourceScan:
    skipped: list[SkippedDocument] = []
    files = list(_walk(root, _compile(include), _compile(exclude), skipped))
    uri_prefix = root.as_uri().rstrip("/") + "/"

    def read_slice(part: list[tuple[str, os.DirEntry[str]]]) -> list[SourceDocument | SkippedDocument]:
        return [_read_file(uri_prefix, rel, entry, max_bytes, extractor) for rel, entry in part]

    with IsolatedExtractor(limits) as extractor:  # its worker starts with the first PDF, DOCX or HTML file
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
    root: Path, wanted: Callable[[str], bool], excluded: Callable[[str], bool], skipped: list[SkippedDocument]
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield (relative posix path, entry) for the wanted files under root; symlinks may not leave it.

    A directory that cannot be listed is skipped as a whole with ``under`` set, so that the
    documents indexed from it are kept; a wanted name that is no regular file is skipped with why.
    """
    root_str = str(root)
    visited = {root_str}
    stack: list[tuple[str, str]] = [(root_str, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedDocument(prefix or ".", f"directory unreadable: {exc.strerror}", under=prefix))
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
                elif wanted(rel):
                    if entry.is_file(follow_symlinks=True):
                        yield rel, entry
                    else:
                        skipped.append(SkippedDocument(rel, _not_a_file(entry)))
            except OSError as exc:
                skipped.append(SkippedDocument(rel, f"unreadable: {exc.strerror}"))


def _not_a_file(entry: os.DirEntry[str]) -> str:
    """Why a wanted name is not read: a dangling symlink, or what kind of file it is."""
    try:
        mode = entry.stat(follow_symlinks=True).st_mode
    except FileNotFoundError:
        return "dangling symlink"
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return f"not a regular file ({next((k for test, k in kinds.items() if test(mode)), 'of another kind')})"


def _read_at_most(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a file swapped for a FIFO since the scan cannot block
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


def _read_file(
    uri_prefix: str, rel: str, entry: os.DirEntry[str], max_bytes: int, extractor: IsolatedExtractor
) -> SourceDocument | SkippedDocument:
    try:
        size = entry.stat(follow_symlinks=True).st_size
        if size > max_bytes:
            return SkippedDocument(rel, f"larger than the {max_bytes}-byte limit ({size} bytes)")
        data = _read_at_most(entry.path, size + 1)  # sized by stat: no 10 MiB buffer for a 1 KiB file
    except OSError as exc:
        return SkippedDocument(rel, f"unreadable: {exc.strerror}")
    if len(data) > size:
        return SkippedDocument(rel, "changed while being read; the next run will pick it up")
    uri = uri_prefix + quote_from_bytes(os.fsencode(rel))
    fmt = EXTRACTED_FORMATS.get(os.path.splitext(rel)[1].lower())
    if fmt is not None:
        extracted = extractor.extract(fmt, data)
        if isinstance(extracted, str):
            return SkippedDocument(rel, extracted)
        return make_document(rel, extracted.text, uri, extracted=extracted, fmt=fmt)
    if b"\x00" in data[:8192]:
        return SkippedDocument(rel, "binary file (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SkippedDocument(rel, f"not valid UTF-8 text (byte {exc.start})")
    return make_document(rel, text, uri)


def _scan_jsonl(path: Path, max_bytes: int) -> SourceScan:
    documents: list[SourceDocument] = []
    skipped: list[SkippedDocument] = []
    first_line: dict[str, int] = {}
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

"""Discovery's types: the documents a source holds, the ones it cannot index and why, one scan's result.

Bad input never stops a run and is never silent: each rejected document becomes a
:class:`SkippedDocument` with its reason. Only a source that cannot be read at all raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pipeline.formats import Layout

if TYPE_CHECKING:
    from pipeline.sources.listing import ListingUpdate

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


@dataclass
class SourceScan:
    """Everything one discovery pass found.

    Attributes:
        source: the source's URI.
        documents: the documents read, sorted by doc_id.
        skipped: what the source holds but this run cannot index.
        unread: doc_ids an object store listed exactly as when they were last indexed: not read,
            since nothing says they changed (the diff counts them unchanged).
        listing: what the registry should remember of the listing once the run succeeded (object
            stores only).
    """

    source: str
    documents: list[SourceDocument]
    skipped: list[SkippedDocument]
    unread: list[str] = field(default_factory=list)
    listing: ListingUpdate | None = None


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates written as backslash escapes, so PostgreSQL can store it."""
    return _UNSTORABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def unstorable_field(doc_id: str, text: str, metadata: dict[str, Any]) -> str | None:
    """Why PostgreSQL cannot store this document (the field, the character and its position), or None.

    Checked before anything is written: text columns cannot hold NUL, UTF-8 cannot encode a lone
    surrogate (JSON allows ``"\\udc80"``; Python decodes a file name that is not UTF-8 into one),
    and PostgreSQL's JSON has no NaN or infinity.
    """
    for field_name, value in (("doc_id", doc_id), ("text", text)):
        problem = _unstorable_string(field_name, value)
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


def _unstorable_string(field_name: str, value: str) -> str | None:
    if value.isascii() and "\x00" not in value:  # the common case, without the regex: isascii is a flag
        return None
    m = _UNSTORABLE.search(value)
    if m is None:
        return None
    char = m.group()
    what = "a NUL character" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return f"{field_name} holds {what} at character {m.start()}, which PostgreSQL cannot store"

"""Hashing stage: normalize document text and derive the content hashes that drive change detection."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

HASH_ALGORITHM = "sha256"
_TRAILING_WS = re.compile(r"[ \t\f\v]+$", re.MULTILINE)


def normalize_text(text: str) -> str:
    """Return the canonical form of a document's text.

    Line endings become ``\\n``, trailing spaces and tabs are dropped from every line, a leading
    byte-order mark and trailing blank lines are removed. Character offsets of chunks index this form.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # the regex is the slow part; most texts have no trailing whitespace at all
    if " \n" in text or "\t\n" in text or "\f" in text or "\v" in text or text[-1:] in (" ", "\t"):
        text = _TRAILING_WS.sub("", text)
    return text.rstrip("\n")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(normalized_text: str) -> str:
    """Hash of a document's normalized text."""
    return sha256_hex(normalized_text)


def metadata_hash(metadata: dict[str, Any], source_uri: str) -> str:
    """Hash of what a document says about itself besides its text (canonical JSON)."""
    if not metadata:  # same bytes as the general form below, without the encoder's overhead
        canonical = "[" + json.dumps(source_uri, ensure_ascii=False) + ",{}]"
    else:
        canonical = json.dumps([source_uri, metadata], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return sha256_hex(canonical)


def chunk_id_for(
    doc_id: str, ordinal: int, heading_path: tuple[str, ...], char_start: int, char_end: int, chunk_hash: str,
    pages: tuple[int, int, str | None, str | None] | None = None,
) -> str:
    """The id of one chunk placement: equal ids mean equal document, position, headings, pages and text.

    ``pages`` (first and last page, their labels) is part of the id only for documents with pages,
    so the ids of every other chunk stay what they were.
    """
    placement: list[Any] = [doc_id, ordinal, list(heading_path), char_start, char_end, chunk_hash]
    if pages is not None:
        placement.append(list(pages))
    canonical = json.dumps(placement, ensure_ascii=False, separators=(",", ":"))
    return sha256_hex(canonical)

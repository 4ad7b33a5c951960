"""What an extractor hands to discovery: a document's text, title, page spans and heading spans (pure data).

Every extractor (``pdf``, ``docx``, ``html``) returns an :class:`Extracted` or raises
:class:`Unextractable` with the reason the document is skipped. The text is already normalized
(``pipeline.hashing.normalize_text`` leaves it unchanged), so the offsets of page and heading spans
index exactly the text that is hashed and chunked.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any


class Unextractable(Exception):
    """A document its extractor cannot read; the message is the skip reason (names no path)."""


@dataclass(frozen=True)
class PageSpan:
    """Where one physical page's text lies in the extracted text: ``text[start:end]``.

    ``number`` is 1-based; ``label`` is the page label the file prints ("iv", "A-3") where the file
    defines labels, else None. Pages are separated by a blank line that belongs to neither.
    """

    number: int
    start: int
    end: int
    label: str | None = None


@dataclass(frozen=True)
class HeadingSpan:
    """A heading that opens a section at ``start`` (a line start) with its full path.

    ``body_start`` is the first character after the heading's own line, or ``start`` when the
    heading's title is not part of the text (a PDF bookmark that points into the page).
    """

    start: int
    body_start: int
    path: tuple[str, ...]


@dataclass(frozen=True)
class PageRange:
    """The pages a span of the text covers, 1-based physical numbers, with their printed labels."""

    start: int
    end: int
    label_start: str | None = None
    label_end: str | None = None


@dataclass(frozen=True)
class Layout:
    """The structure an extractor found: page spans (PDF) and heading spans (outline, styles, h1-h6)."""

    pages: tuple[PageSpan, ...] = ()
    headings: tuple[HeadingSpan, ...] = ()
    _page_starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_page_starts", tuple(p.start for p in self.pages))

    def pages_of(self, start: int, end: int) -> PageRange | None:
        """The pages holding characters ``start`` and ``end - 1`` (None when the document has no pages)."""
        if not self.pages:
            return None
        first = self._page_at(start)
        last = self._page_at(max(start, end - 1))
        return PageRange(first.number, last.number, first.label, last.label)

    def _page_at(self, offset: int) -> PageSpan:
        i = bisect.bisect_right(self._page_starts, offset) - 1
        return self.pages[max(0, i)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the run workspace of orchestrated runs)."""
        return {
            "pages": [[p.number, p.start, p.end, p.label] for p in self.pages],
            "headings": [[h.start, h.body_start, list(h.path)] for h in self.headings],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Layout | None":
        if not data:
            return None
        return cls(
            pages=tuple(PageSpan(int(n), int(s), int(e), lab) for n, s, e, lab in data.get("pages", [])),
            headings=tuple(HeadingSpan(int(s), int(b), tuple(p)) for s, b, p in data.get("headings", [])),
        )


@dataclass(frozen=True)
class Extracted:
    """One extracted document.

    Attributes:
        text: the normalized text a reader sees, in reading order.
        title: the document's title (its metadata, else its first heading), or None.
        layout: page and heading spans over ``text``.
        extractor: the extractor and library versions that produced it (part of the chunker
            configuration: another version re-chunks the document).
    """

    text: str
    title: str | None
    layout: Layout
    extractor: str


def clean_line(line: str) -> str:
    """One line of extracted text: control characters dropped, ligatures spelled out, no trailing space."""
    if _UNCLEAN.search(line):
        line = _UNCLEAN.sub(lambda m: _LIGATURES.get(m.group(), ""), line)
    return line.rstrip()


_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st",
              "\ufb06": "st", "\t": " "}  # fmt: skip
# C0/C1 controls (tabs become spaces), soft hyphens, BOMs, pdfium's U+FFFE/U+FFFF line-break hyphen marks
_UNCLEAN = re.compile("[\x00-\x08\x09\x0b-\x1f\x7f-\x9f\u00ad\ufeff\ufffe\uffff\ufb00-\ufb06]")


class TextBuilder:
    """Assembles blocks of text into one normalized text, recording where headings and pages fall.

    Blocks are separated by a blank line, a ``tight`` block (the next list item or table row) from
    the one before by a line break.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.headings: list[HeadingSpan] = []
        self._stack: list[tuple[int, str]] = []

    def add(self, block: str, *, tight: bool = False) -> int | None:
        """Append a block (cleaned line by line; empty ones are dropped); return its start offset."""
        lines = [clean_line(line) for line in block.split("\n")]
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            return None
        if self.parts:
            sep = "\n" if tight else "\n\n"
            self.parts.append(sep)
            self.length += len(sep)
        start = self.length
        text = "\n".join(lines)
        self.parts.append(text)
        self.length += len(text)
        return start

    def heading(self, title: str, level: int) -> None:
        """Append a heading block of ``level`` (1 = top); later blocks fall under it."""
        title = " ".join(clean_line(title).split())
        start = self.add(title)
        if start is None:
            return
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))
        self.headings.append(HeadingSpan(start, self.length, tuple(t for _, t in self._stack)))

    def text(self) -> str:
        return "".join(self.parts)

"""PDF extraction: pdfium's text page by page, page labels, the outline (bookmarks) as heading paths.

pypdfium2 (PDFium, the engine of Chrome's PDF viewer, maintained by Google and built for every
platform as a wheel) reads the text layer in content order, with hyphenation marks it generated
itself told apart from real hyphens, and gives character boxes, page labels and the outline with
each bookmark's page and position. A page's text becomes one block; pages are separated by a blank
line, and every page's span is recorded, so each chunk knows its pages. A bookmark becomes a heading
at the start of the line it points at; its path is its place in the outline tree.

Skipped, each with its own reason: encrypted files (a password is needed to read them), files with
no text layer (scanned or image-only: fewer than 16 non-space characters per page), and damaged
files (PDFium cannot parse them, or a page of them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pipeline.formats.extracted import Extracted, HeadingSpan, Layout, PageSpan, Unextractable, clean_line
from registry.extras import require

ALGORITHM = "pdf-1"
MIN_CHARS_PER_PAGE = 16  # below this on average, a PDF has no text layer worth indexing
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ERRORS = {2: "the file cannot be opened or is not a PDF", 3: "its structure cannot be parsed",
           5: "it uses an unsupported security handler", 6: "a page cannot be parsed"}  # fmt: skip
_PASSWORD = 4  # FPDF_ERR_PASSWORD


def version() -> str:
    """The extractor's version: this module's algorithm and the pypdfium2 (and PDFium) release."""
    return f"{ALGORITHM};pypdfium2={metadata.version('pypdfium2')}"


@dataclass(frozen=True)
class _Bookmark:
    path: tuple[str, ...]
    page: int  # 0-based
    y: float | None  # PDF user space, origin at the bottom; None: the top of the page


def extract(data: bytes) -> Extracted:
    """Extract a PDF's text, pages, outline and title.

    Raises:
        Unextractable: encrypted, no text layer, or damaged (the reason says which).
    """
    pdfium = require("pypdfium2", "pipeline", "reading PDF files")
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == _PASSWORD:
            raise Unextractable("encrypted PDF: it needs a password to be read") from None
        raise Unextractable(f"damaged PDF: {_ERRORS.get(code, str(exc))}") from None
    try:
        return _extract(pdfium, pdf)
    finally:
        pdf.close()


def _extract(pdfium: Any, pdf: Any) -> Extracted:
    count = len(pdf)
    if count == 0:
        raise Unextractable("damaged PDF: it has no pages")
    bookmarks = _outline(pdf, count)
    by_page: dict[int, list[int]] = {}
    for i, mark in enumerate(bookmarks):
        by_page.setdefault(mark.page, []).append(i)

    pages: list[PageSpan] = []
    anchors: dict[int, int] = {}  # bookmark index -> offset in the text
    parts: list[str] = []
    length = 0
    chars = 0
    image_pages = 0
    for number in range(count):
        try:
            page = pdf[number]
            textpage = page.get_textpage()
        except pdfium.PdfiumError:
            raise Unextractable(f"damaged PDF: page {number + 1} of {count} cannot be parsed") from None
        try:
            raw = textpage.get_text_range()
            lines = [clean_line(line) for line in _LINE_BREAK.split(raw)]
            marks = by_page.get(number, [])
            line_of = {i: _anchor_line(textpage, raw, bookmarks[i].y) for i in marks}
            if _has_image(pdfium, page):
                image_pages += 1
        finally:
            textpage.close()
            page.close()
        first = next((k for k, line in enumerate(lines) if line.strip()), len(lines))
        last = max((k for k, line in enumerate(lines) if line.strip()), default=-1)
        kept = lines[first : last + 1]
        chars += sum(len(line) - line.count(" ") for line in kept)
        line_of = {i: min(max(k - first, 0), max(len(kept) - 1, 0)) for i, k in line_of.items()}
        kept, line_of = _separate_headings(kept, line_of, bookmarks)
        if number:
            parts.append("\n\n")
            length += 2
        starts = [length]
        for line in kept:
            starts.append(starts[-1] + len(line) + 1)
        for i, k in line_of.items():
            anchors[i] = starts[k]
        text = "\n".join(kept)
        label = pdf.get_page_label(number) or None
        pages.append(PageSpan(number + 1, length, length + len(text), label))
        parts.append(text)
        length += len(text)

    if chars < MIN_CHARS_PER_PAGE * count:
        images = f"{image_pages} of them with images" if image_pages else "no images"
        raise Unextractable(
            f"no text layer (scanned or image-only PDF: {count} page{'s' * (count != 1)}, {images}, "
            f"{chars} characters of text); OCR it to index it"
        )
    full = "".join(parts).rstrip("\n")
    pages = [PageSpan(p.number, min(p.start, len(full)), min(p.end, len(full)), p.label) for p in pages]
    headings = _headings(full, bookmarks, anchors)
    title = _title(pdf) or (bookmarks[0].path[0] if bookmarks else None)
    return Extracted(full, title, Layout(tuple(pages), headings), version())


def _separate_headings(
    lines: list[str], line_of: dict[int, int], bookmarks: list[_Bookmark]
) -> tuple[list[str], dict[int, int]]:
    """A line that shows its bookmark's title is a heading: a blank line after it makes it a block of
    its own, as headings are in the other formats (the chunker joins a heading to what follows)."""
    headings = sorted({k for i, k in line_of.items() if _shows_title(lines[k], bookmarks[i].path[-1])})
    if not headings:
        return lines, line_of
    out: list[str] = []
    moved: dict[int, int] = {}
    for k, line in enumerate(lines):
        moved[k] = len(out)
        out.append(line)
        if k in headings and k + 1 < len(lines) and lines[k + 1].strip():
            out.append("")
    return out, {i: moved[k] for i, k in line_of.items()}


def _shows_title(line: str, title: str) -> bool:
    return bool(title) and title in " ".join(line.split()) and len(line) <= 2 * len(title) + 16


def _outline(pdf: Any, count: int) -> list[_Bookmark]:
    """Bookmarks that point at a page of this file, in outline order, each with its path in the tree."""
    marks: list[_Bookmark] = []
    path: list[str] = []
    try:
        for item in pdf.get_toc(max_depth=16):
            title = " ".join(clean_line(item.get_title() or "").split())
            del path[item.level :]
            path.append(title)
            dest = item.get_dest()
            index = dest.get_index() if dest is not None else None
            if index is None or not 0 <= index < count or not all(path):
                continue
            mode, params = dest.get_view()
            marks.append(_Bookmark(tuple(path), index, _top_of_view(mode, params)))
    except Exception:  # a broken outline costs the headings, not the document
        return marks
    return marks


def _top_of_view(mode: int, params: list[float]) -> float | None:
    """The top a destination shows: XYZ (left, top, zoom), FitH and FitBH (top), FitR (l, b, r, top)."""
    where = {1: 1, 3: 0, 7: 0, 5: 3}.get(mode)
    if where is None or len(params) <= where:
        return None
    return float(params[where])


def _anchor_line(textpage: Any, raw: str, y: float | None) -> int:
    """The line of ``raw`` holding the first character at or below ``y`` (0: the page's first line)."""
    if y is None:
        return 0
    n = textpage.count_chars()
    for index in range(n):
        left, bottom, right, top = textpage.get_charbox(index)
        if top <= y + 1.0 and right > left:
            offset = len(textpage.get_text_range(0, index)) if index else 0
            return len(_LINE_BREAK.findall(raw, 0, offset))
    return 0


def _has_image(pdfium: Any, page: Any) -> bool:
    image = pdfium.raw.FPDF_PAGEOBJ_IMAGE
    return any(obj.type == image for obj in page.get_objects(max_depth=2))


def _headings(text: str, bookmarks: list[_Bookmark], anchors: dict[int, int]) -> tuple[HeadingSpan, ...]:
    """One heading per anchored position, the first bookmark in outline order winning a shared one."""
    placed: dict[int, tuple[str, ...]] = {}
    for i, mark in enumerate(bookmarks):
        if i in anchors:
            placed.setdefault(anchors[i], mark.path)
    spans = []
    for start in sorted(placed):
        if start >= len(text):
            continue
        path = placed[start]
        line_end = text.find("\n", start)
        line_end = len(text) if line_end == -1 else line_end
        # the bookmark's title is the line it points at (hyperref's \section): that line is the heading
        body = line_end if _shows_title(text[start:line_end], path[-1]) else start
        spans.append(HeadingSpan(start, body, path))
    return tuple(spans)


def _title(pdf: Any) -> str | None:
    try:
        value = pdf.get_metadata_value("Title")
    except Exception:
        return None
    title = " ".join(clean_line(value or "").split())
    return title or None

"""DOCX extraction (python-docx): paragraphs in body order, headings by style, lists and tables as text.

Headings are paragraphs styled "Heading N" (or a style based on one, or with an outline level);
their titles form the heading path. List items become lines ("- " for bullets, "3. " for numbered
lists, indented by level); a table becomes one line per row, its cells joined by " | ". The title
is the file's core property, else its "Title" paragraph, else its first heading.

A DOCX is a zip archive: before python-docx inflates it, the sizes its members declare are added
up and an archive that would expand beyond ``max_unzipped_bytes`` is refused as a zip bomb.
(Python's zipfile never inflates a member past its declared size, so a member that lies about its
size fails its CRC check instead of expanding further.)
"""

from __future__ import annotations

import io
import re
import zipfile
from importlib import metadata
from typing import Any

from pipeline.formats.extracted import Extracted, Layout, TextBuilder, Unextractable
from registry.extras import require

ALGORITHM = "docx-1"
MAX_MEMBERS = 10_000
_HEADING_STYLE = re.compile(r"^heading\s*([1-9])$", re.IGNORECASE)
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def version() -> str:
    return f"{ALGORITHM};python-docx={metadata.version('python-docx')}"


def check_archive(data: bytes, max_unzipped_bytes: int) -> None:
    """Refuse what is not a zip archive, or what would expand beyond ``max_unzipped_bytes``.

    Raises:
        Unextractable: damaged (not a zip) or a zip bomb.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise Unextractable("damaged DOCX: it is not a readable zip archive") from None
    if len(members) > MAX_MEMBERS:
        raise Unextractable(f"refused as a zip bomb: {len(members)} zip members, over the limit of {MAX_MEMBERS}")
    expanded = sum(m.file_size for m in members)
    if expanded > max_unzipped_bytes:
        raise Unextractable(
            f"refused as a zip bomb: its {len(members)} zip members expand to {expanded} bytes "
            f"({expanded / max(1, len(data)):.0f}x the file), over the {max_unzipped_bytes}-byte limit "
            "(RAGPIPE_MAX_UNZIPPED_BYTES)"
        )


def extract(data: bytes, *, max_unzipped_bytes: int | None = None) -> Extracted:
    """Extract a DOCX's text, headings and title.

    Raises:
        Unextractable: damaged, or refused as a zip bomb.
    """
    from pipeline.formats.isolation import DEFAULT_MAX_UNZIPPED_BYTES

    check_archive(data, DEFAULT_MAX_UNZIPPED_BYTES if max_unzipped_bytes is None else max_unzipped_bytes)
    docx = require("docx", "pipeline", "reading DOCX files")
    not_a_package = require("docx.opc.exceptions", "pipeline", "reading DOCX files").PackageNotFoundError
    try:
        document = docx.Document(io.BytesIO(data))
    except (KeyError, ValueError, zipfile.BadZipFile, not_a_package) as exc:
        raise Unextractable(f"damaged DOCX: {type(exc).__name__}: {str(exc)[:200]}") from None
    table_type = require("docx.table", "pipeline", "reading DOCX files").Table

    builder = TextBuilder()
    numbering = _Numbering(document)
    title_paragraph: str | None = None
    in_list = False
    for block in document.iter_inner_content():
        marker = None
        if isinstance(block, table_type):
            _add_table(builder, block)
        elif (level := _heading_level(block)) is not None:
            builder.heading(block.text, level)
        else:
            marker = numbering.marker(block)
            title_paragraph = title_paragraph or _title_paragraph(block)
            text = block.text
            if marker is not None:
                builder.add(marker + " ".join(text.split()), tight=in_list)
            else:
                builder.add(text)
        in_list = marker is not None
    text = builder.text()
    title = " ".join((document.core_properties.title or "").split()) or title_paragraph
    if not title and builder.headings:
        title = builder.headings[0].path[-1]
    return Extracted(text, title or None, Layout(headings=tuple(builder.headings)), version())


def _title_paragraph(paragraph: Any) -> str | None:
    names = _style_names(paragraph)
    return " ".join(paragraph.text.split()) or None if names and names[0] == "title" else None


def _style_names(paragraph: Any) -> list[str]:
    """The paragraph's style and the styles it is based on, lowercased, nearest first."""
    names = []
    style = paragraph.style
    while style is not None and len(names) < 10:
        names.append((style.name or "").strip().lower())
        style = style.base_style
    return names


def _heading_level(paragraph: Any) -> int | None:
    for name in _style_names(paragraph):
        m = _HEADING_STYLE.match(name)
        if m:
            return int(m.group(1))
    ppr = paragraph._p.pPr
    outline = ppr.find(f"{_W}outlineLvl") if ppr is not None else None
    if outline is not None and (value := outline.get(f"{_W}val", "")).isdigit() and int(value) < 9:
        return int(value) + 1
    return None


def _add_table(builder: TextBuilder, table: Any) -> None:
    first = True
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            if id(cell._tc) in seen:  # a merged cell repeats itself once per grid column
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        line = " | ".join(cells)
        if line.strip(" |"):
            builder.add(line, tight=not first)
            first = False


class _Numbering:
    """List markers from the numbering part: bullets, or the running number of each list level."""

    def __init__(self, document: Any) -> None:
        self.formats: dict[tuple[str, int], str] = {}
        self.counters: dict[tuple[str, int], int] = {}
        try:
            root = document.part.numbering_part.element
        except (KeyError, NotImplementedError, AttributeError):
            return
        abstract = {a.get(f"{_W}abstractNumId"): a for a in root.findall(f"{_W}abstractNum")}
        for num in root.findall(f"{_W}num"):
            ref = num.find(f"{_W}abstractNumId")
            definition = abstract.get(ref.get(f"{_W}val")) if ref is not None else None
            if definition is None:
                continue
            for lvl in definition.findall(f"{_W}lvl"):
                fmt = lvl.find(f"{_W}numFmt")
                self.formats[(num.get(f"{_W}numId") or "", int(lvl.get(f"{_W}ilvl") or 0))] = (
                    fmt.get(f"{_W}val") if fmt is not None else "bullet") or "bullet"

    def marker(self, paragraph: Any) -> str | None:
        num_id, level = self._num_pr(paragraph)
        if num_id is None or num_id == "0":
            return None
        key = (num_id, level)
        for other in [k for k in self.counters if k[0] == num_id and k[1] > level]:
            del self.counters[other]  # a deeper list restarts under each new item
        indent = "  " * level
        if self.formats.get(key, "bullet") in ("bullet", "none"):
            return indent + "- "
        self.counters[key] = self.counters.get(key, 0) + 1
        return f"{indent}{self.counters[key]}. "

    @staticmethod
    def _num_pr(paragraph: Any) -> tuple[str | None, int]:
        elements = [paragraph._p.pPr]
        style = paragraph.style
        while style is not None and len(elements) < 10:
            elements.append(style.element.pPr)
            style = style.base_style
        for ppr in elements:
            num_pr = ppr.find(f"{_W}numPr") if ppr is not None else None
            if num_pr is None:
                continue
            num_id = num_pr.find(f"{_W}numId")
            ilvl = num_pr.find(f"{_W}ilvl")
            level = int(ilvl.get(f"{_W}val") or 0) if ilvl is not None else 0
            return (num_id.get(f"{_W}val") if num_id is not None else None), level
        return None, 0

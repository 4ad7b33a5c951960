"""Chunking's first stage: a document's sections (heading path and span) from its structure.

Markdown and reStructuredText headings, Python top-level functions and classes (``ast``), the
declarations of other source code (tree-sitter, ``pipeline.code``), an extractor's headings for
PDF, DOCX and HTML files; one section for plain text. Pure functions of the text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from pipeline.code import CODE_FORMATS, code_layout
from pipeline.sources import SourceDocument


@dataclass(frozen=True)
class Section:
    heading_path: tuple[str, ...]
    start: int
    end: int
    body_start: int  # first character after the heading line(s); == start when there is no heading


_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_RST_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}$")


def _line_starts(text: str) -> list[int]:
    starts = [0]
    pos = text.find("\n")
    while pos != -1:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


def _build_sections(text: str, headings: list[tuple[int, int, int, str]]) -> list[Section]:
    """Turn headings (start, body_start, level, title) into contiguous sections covering text."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    if not headings or headings[0][0] > 0:
        first = headings[0][0] if headings else len(text)
        if text[:first].strip():
            sections.append(Section((), 0, first, 0))
        elif headings:
            headings[0] = (0, *headings[0][1:])
    for i, (start, body_start, level, title) in enumerate(headings):
        end = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        sections.append(Section(tuple(t for _, t in path), start, end, body_start))
    return sections


def markdown_sections(text: str) -> list[Section]:
    lines = text.split("\n")
    starts = _line_starts(text)
    headings: list[tuple[int, int, int, str]] = []
    fence: str | None = None
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is not None:
            continue
        m = _ATX.match(line)
        if m:
            title = (m.group(2) or "").strip()
            body = starts[i + 1] if i + 1 < len(starts) else len(text)
            headings.append((starts[i], body, len(m.group(1)), title))
            continue
        if i > 0 and _SETEXT.match(line) and lines[i - 1].strip() and (i < 2 or not lines[i - 2].strip()):
            prev = lines[i - 1]
            if not _ATX.match(prev) and not prev.startswith(("    ", "\t", ">", "-", "*", "|")):
                level = 1 if line.strip()[0] == "=" else 2
                if headings and headings[-1][0] == starts[i - 1]:
                    continue
                body = starts[i + 1] if i + 1 < len(starts) else len(text)
                headings.append((starts[i - 1], body, level, prev.strip()))
    return _build_sections(text, headings)


def rst_sections(text: str) -> list[Section]:
    lines = text.split("\n")
    starts = _line_starts(text)
    headings: list[tuple[int, int, int, str]] = []
    styles: dict[tuple[str, bool], int] = {}
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        blank_before = i == 0 or not lines[i - 1].strip()
        # overline + title + underline
        if (
            blank_before
            and _RST_ADORNMENT.match(line)
            and i + 2 < n
            and lines[i + 1].strip()
            and lines[i + 2] == line
            and len(line) >= len(lines[i + 1].strip())
        ):
            key = (line[0], True)
            level = styles.setdefault(key, len(styles) + 1)
            body = starts[i + 3] if i + 3 < n else len(text)
            headings.append((starts[i], body, level, lines[i + 1].strip()))
            i += 3
            continue
        # title + underline
        if (
            blank_before
            and line.strip()
            and not line[0].isspace()
            and i + 1 < n
            and _RST_ADORNMENT.match(lines[i + 1])
            and len(lines[i + 1]) >= len(line.rstrip())
            and not _RST_ADORNMENT.match(line)
        ):
            key = (lines[i + 1][0], False)
            level = styles.setdefault(key, len(styles) + 1)
            body = starts[i + 2] if i + 2 < n else len(text)
            headings.append((starts[i], body, level, line.strip()))
            i += 2
            continue
        i += 1
    return _build_sections(text, headings)


def python_sections(text: str) -> list[Section]:
    """Top-level functions and classes; a class's methods are subsections. Falls back to one section."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return [Section((), 0, len(text), 0)]
    starts = _line_starts(text)

    def offset(lineno: int) -> int:
        return starts[lineno - 1] if lineno - 1 < len(starts) else len(text)

    def first_line(node: ast.stmt) -> int:
        decorators = getattr(node, "decorator_list", [])
        return min([node.lineno] + [d.lineno for d in decorators])

    headings: list[tuple[int, int, int, str]] = []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, defs):
            headings.append((offset(first_line(node)), offset(node.lineno + 1), 1, node.name))
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, defs):
                        headings.append((offset(first_line(child)), offset(child.lineno + 1), 2, child.name))
            end = offset((node.end_lineno or node.lineno) + 1)
            headings.append((end, end, 1, ""))  # module code after the definition
    # drop the "after" markers that coincide with the next definition or the end of the text
    cleaned: list[tuple[int, int, int, str]] = []
    for h in sorted(headings, key=lambda h: (h[0], h[3] == "")):
        if h[3] == "" and (h[0] >= len(text) or any(o[0] == h[0] and o[3] for o in headings)):
            continue
        if cleaned and cleaned[-1][0] == h[0]:
            continue
        cleaned.append(h)
    sections = _build_sections(text, cleaned)
    # module-level code between definitions carries an empty path
    return [Section(tuple(p for p in s.heading_path if p), s.start, s.end, s.body_start) for s in sections]


def document_sections(doc: SourceDocument) -> list[Section]:
    """The sections of a document: its extractor's headings when it has them, else by its format."""
    if doc.layout is None:
        return split_sections(doc.text, doc.format)
    sections: list[Section] = []
    headings = doc.layout.headings
    if not headings or headings[0].start > 0:
        sections.append(Section((), 0, headings[0].start if headings else len(doc.text), 0))
    for i, heading in enumerate(headings):
        end = headings[i + 1].start if i + 1 < len(headings) else len(doc.text)
        sections.append(Section(heading.path, heading.start, end, heading.body_start))
    return sections


def split_sections(text: str, fmt: str) -> list[Section]:
    if fmt == "markdown":
        return markdown_sections(text)
    if fmt == "rst":
        return rst_sections(text)
    if fmt == "python":
        return python_sections(text)
    if fmt in CODE_FORMATS and (layout := code_layout(text, fmt)) is not None:
        return [Section(*s) for s in layout.sections]
    return [Section((), 0, len(text), 0)]



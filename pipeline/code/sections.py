"""Chunking stage, source code: a parse tree's declarations walked into sections, each a heading path
and the units (nodes kept together) it holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.code.declarations import declaration, flatten
from pipeline.code.source import MAX_DEPTH, CodeText, braces


class CodeSection(NamedTuple):
    """One section of a code file (character offsets; ``pipeline.chunking.Section``'s fields)."""

    heading_path: tuple[str, ...]
    start: int
    end: int
    body_start: int


class Unit(NamedTuple):
    """Nodes kept together unless too long (a declaration with its comments, a header, a statement)."""

    start: int  # bytes
    end: int
    kids: tuple[Any, ...]  # nodes covering [start, end), for cutting it at statement boundaries


@dataclass
class Sec:
    """A section as the walk builds it (byte offsets)."""

    path: tuple[str, ...]
    units: list[Unit]
    body_start: int | None = None  # bytes; a container header's: just after its opening brace
    takes_code: bool = True  # a header or code section: code that follows at its level joins it


def walk(src: CodeText, kids: Sequence[Any], path: tuple[str, ...], secs: list[Sec], depth: int = 0) -> None:
    """Append to ``secs`` the sections of ``kids``, nodes at one level under the names ``path``."""
    for group in src.groups(kids):
        main = next((n for n in group if n.type not in src.prelude), None)
        decl = declaration(main, src.family) if main is not None and main.is_named else None
        unit = Unit(group[0].start_byte, group[-1].end_byte, tuple(group))
        found = _members(decl.body) if decl is not None and decl.body is not None else None
        if decl is None:
            stray = main is not None and not main.is_named  # a `;` after a declaration stays with it
            if secs and (stray or (secs[-1].takes_code and secs[-1].path == path)):
                secs[-1].units.append(unit)  # code at this level joins the code or header before it
            else:
                secs.append(Sec(path, [unit]))
        elif found is None or depth >= MAX_DEPTH:
            secs.append(Sec(path + decl.names, [unit], takes_code=False))
        else:
            opening, closing, inner = found
            lead = tuple(n for n in group if n.end_byte <= main.start_byte)
            trail = tuple(n for n in group if n.start_byte >= main.end_byte)
            header = Unit(unit.start, opening.end_byte, lead + tuple(_cover(main, unit.start, opening.end_byte)))
            secs.append(Sec(path + decl.names, [header], body_start=opening.end_byte))
            walk(src, inner, path + decl.names, secs, depth + 1)
            tail_kids = tuple(_cover(main, closing.start_byte, main.end_byte)) + trail
            secs[-1].units.append(Unit(closing.start_byte, unit.end, tail_kids))


def code_sections(src: CodeText, secs: list[Sec]) -> list[CodeSection]:
    """The walk's sections in character offsets, each running to the next (the first from the file's start)."""
    starts = [src.line_start(s.units[0].start) for s in secs]
    if starts:
        starts[0] = 0
    ends = starts[1:] + [len(src.data)]
    out = []
    for sec, start, end in zip(secs, starts, ends):
        body = sec.body_start if sec.body_start is not None else start
        out.append(CodeSection(sec.path, src.char(start), src.char(end), src.char(body)))
    return out


def _members(body: Any) -> tuple[Any, Any, list[Any]] | None:
    """A container body's opening brace, closing brace and the nodes between them."""
    kids = body.children
    opening, closing = braces(kids)
    if opening is None or closing is None or closing <= opening:
        return None
    return kids[opening], kids[closing], flatten(kids[opening + 1 : closing])


def _cover(node: Any, start: int, end: int) -> list[Any]:
    """The fewest descendants of ``node`` that cover its bytes in [start, end)."""
    out: list[Any] = []
    for kid in node.children:
        if kid.end_byte <= start or kid.start_byte >= end:
            continue
        if start <= kid.start_byte and kid.end_byte <= end:
            out.append(kid)
        else:
            out.extend(_cover(kid, start, end))
    return out

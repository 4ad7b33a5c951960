"""Chunking stage, source code: a code file's layout (its sections and each section's blocks), or
none when its parse tree has errors or would lose text (see ``pipeline.code`` for the contract)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.code.blocks import BlockCutter, MemoCounter
from pipeline.code.grammars import GRAMMARS, parse
from pipeline.code.sections import CodeSection, Sec, code_sections, walk
from pipeline.code.source import CodeText

if TYPE_CHECKING:  # pipeline.chunking imports this package to dispatch code formats here
    from pipeline.chunking import TokenCounter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeLayout:
    """A code file cut into sections and, when a token counter was given, each section's blocks."""

    sections: list[CodeSection]
    blocks: list[list[tuple[int, int]]]  # per section: character spans in order, trimmed of whitespace
    counter: TokenCounter | None  # the counter given, remembering the count of every block


def code_layout(
    text: str, fmt: str, counter: TokenCounter | None = None, max_tokens: int = 0, doc_id: str = ""
) -> CodeLayout | None:
    """Cut a code file into sections (and, given a counter, blocks of at most ``max_tokens`` tokens).

    Args:
        text: the file's normalized text.
        fmt: one of ``CODE_FORMATS``.
        counter: the embedding model's token counter; without one the blocks are empty lists.
        max_tokens: the most tokens a block may hold (a single longer token is left to the text cutter).
        doc_id: names the document in the warning a parse error logs.

    Returns:
        The layout, or None when the file does not parse cleanly (the caller chunks it as plain text).

    Raises:
        MissingExtra: tree-sitter or the format's grammar is not installed.
    """
    grammar = GRAMMARS[fmt]
    data = text.encode("utf-8")
    # normalized text has no final newline; Go's grammar ends every declaration with one
    tree = parse(data + b"\n", fmt)
    root = tree.root_node
    if root.has_error:
        line = _first_error(root).start_point[0] + 1
        logger.warning("%s: %s syntax error at line %d; chunked as plain text", doc_id or "document", grammar.language,
                       line)
        return None
    src = CodeText(text, data, grammar.family)
    secs: list[Sec] = []
    walk(src, root.children, (), secs)
    sections = code_sections(src, secs)
    if counter is None:
        return CodeLayout(sections, [[] for _ in sections], None)
    memo = MemoCounter(counter)
    cutter = BlockCutter(src, memo, max_tokens)
    blocks = [cutter.blocks(sec) for sec in secs]
    flat = [span for spans in blocks for span in spans]
    in_order = bool(flat) and all(a[1] <= b[0] for a, b in zip(flat, flat[1:]))
    if not in_order or "".join(text.split()) != "".join("".join(text[s:e] for s, e in flat).split()):
        logger.warning("%s: the %s parse tree does not cover the text; chunked as plain text", doc_id or "document",
                       grammar.language)
        return None
    memo.count([text[s:e] for s, e in flat])
    return CodeLayout(sections, blocks, memo)


def _first_error(node: Any) -> Any:
    """The first error or missing node of a tree with errors (for the warning's line number)."""
    while not (node.is_error or node.is_missing):
        # a missing token can show as an empty node that is neither missing nor an error
        inner = next((c for c in node.children if c.has_error or c.is_error or c.is_missing
                      or c.start_byte == c.end_byte), None)
        if inner is None:
            return node
        node = inner
    return node

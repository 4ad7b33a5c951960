"""Chunking stage, source code: one parsed file's text as the section walk and the block cutter read
it: byte offsets (tree-sitter's) to character offsets, and which nodes stay together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.code.declarations import COMMENTS, PRELUDE

MAX_DEPTH = 200  # deeper syntax (generated code) is left whole for the text cutter; Python's stack is finite


class CodeText:
    """A code file's text and its UTF-8 bytes (which the parse tree's offsets count), in one language family."""

    def __init__(self, text: str, data: bytes, family: str) -> None:
        self.text = text
        self.data = data
        self.family = family
        self.prelude = PRELUDE[family]
        if len(data) == len(text):
            self._chars: np.ndarray | None = None  # ASCII: byte and character offsets agree
        else:
            starts = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80  # first bytes of UTF-8 characters
            self._chars = np.concatenate([[0], np.cumsum(starts)])

    def char(self, byte: int) -> int:
        byte = min(byte, len(self.data))  # the parser saw one more newline than the text holds
        return byte if self._chars is None else int(self._chars[byte])

    def chars(self, start: int, end: int) -> str:
        return self.text[self.char(start) : self.char(end)]

    def line_start(self, byte: int) -> int:
        """Where the line of ``byte`` starts when only whitespace precedes it there, else ``byte``."""
        line = self.data.rfind(b"\n", 0, byte) + 1
        return line if not self.data[line:byte].strip() else byte

    def trimmed(self, start: int, end: int) -> tuple[int, int] | None:
        """The byte span as a character span without its surrounding whitespace; None when nothing is left."""
        s, e = self.char(start), self.char(end)
        while s < e and self.text[s].isspace():
            s += 1
        while e > s and self.text[e - 1].isspace():
            e -= 1
        return (s, e) if s < e else None

    # -- comment attachment -------------------------------------------------------------------

    def _newlines(self, a: int, b: int) -> int:
        """Line breaks between a node ending at ``a`` and one starting at ``b`` (Rust's line comments
        end with their own)."""
        return self.data.count(b"\n", a, b) + (a > 0 and self.data[a - 1] == 0x0A)

    def groups(self, kids: Sequence[Any]) -> list[list[Any]]:
        """Consecutive nodes that stay together: a declaration or statement with the comments and
        attributes before it, the punctuation after it and a comment ending its last line."""
        groups: list[list[Any]] = []
        lead: list[Any] = []
        for kid in kids:
            if lead and lead[-1].type in COMMENTS and self._newlines(lead[-1].end_byte, kid.start_byte) >= 2:
                # a blank line detaches a comment from what follows
                groups.append(lead)
                lead = []
            if kid.type in self.prelude:
                trailing = (kid.type in COMMENTS and groups and not lead
                            and self._newlines(groups[-1][-1].end_byte, kid.start_byte) == 0)
                if trailing:
                    groups[-1].append(kid)
                else:
                    lead.append(kid)
            elif not kid.is_named and groups and not lead:
                groups[-1].append(kid)  # `;` or `,` after a statement stays with it
            else:
                groups.append(lead + [kid])
                lead = []
        if lead:
            groups.append(lead)
        return groups


def braces(kids: Sequence[Any]) -> tuple[int | None, int | None]:
    """The indices of the first opening and the last closing brace among ``kids`` (None where there is none)."""
    opening = next((i for i, k in enumerate(kids) if k.type == "{" and not k.is_named), None)
    closing = next((i for i in range(len(kids) - 1, -1, -1) if kids[i].type == "}" and not kids[i].is_named), None)
    return opening, closing

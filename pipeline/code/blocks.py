"""Chunking stage, source code: a section's units cut into blocks of at most the token limit, at
statement boundaries (``pipeline.chunking`` packs the blocks into chunks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.code.declarations import flatten
from pipeline.code.sections import Sec
from pipeline.code.source import MAX_DEPTH, CodeText, braces

if TYPE_CHECKING:  # pipeline.chunking imports this package to dispatch code formats here
    from pipeline.chunking import TokenCounter


class MemoCounter:
    """The caller's counter, remembering counts: the packer asks again for every block counted here."""

    def __init__(self, counter: TokenCounter) -> None:
        self.name = counter.name
        self._counter = counter
        self._memo: dict[str, int] = {}

    def count(self, texts: Sequence[str]) -> list[int]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, self._counter.count(missing)))
        return [self._memo[t] for t in texts]


class BlockCutter:
    """Cuts the sections of one file into blocks of at most ``max_tokens`` tokens by ``counter``."""

    def __init__(self, src: CodeText, counter: TokenCounter, max_tokens: int) -> None:
        self.src = src
        self.counter = counter
        self.max_tokens = max_tokens

    def blocks(self, sec: Sec) -> list[tuple[int, int]]:
        """A section's blocks: character spans in order, trimmed of whitespace."""
        counts = self.sizes([(u.start, u.end) for u in sec.units])
        spans: list[tuple[int, int]] = []
        for unit, tokens in zip(sec.units, counts):
            if tokens <= self.max_tokens or not unit.kids:
                spans.append((unit.start, unit.end))
                continue
            cut, tail, _ = self.cut(unit.kids, unit.start, 0, 0)
            spans.extend(cut)
            spans.append((tail, unit.end))
        return [s for s in (self.src.trimmed(a, b) for a, b in spans) if s is not None]

    def sizes(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        """Token counts of byte spans, exact up to the limit; ``max_tokens + 1`` stands for "more".

        A long span is counted by its leading words (cut at whitespace, so they are tokenized as in
        the whole), four times more of them each round, until they exceed the limit or are all of
        it: the rest of a long span is never tokenized. Without this a deeply nested statement (a
        bundled module, a test suite in one call) would be tokenized again at every level it is
        opened at.
        """
        max_tokens = self.max_tokens
        texts = [self.src.chars(start, end) for start, end in spans]
        counts = [0] * len(texts)
        todo = list(range(len(texts)))
        cap = 4 * max_tokens + 16  # characters: about the limit's worth of code; grown when it is not
        while todo:
            heads = [_leading_words(texts[i], cap) for i in todo]
            for i, head, n in zip(todo, heads, self.counter.count(heads)):
                counts[i] = n
            todo = [i for i, head in zip(todo, heads) if counts[i] <= max_tokens and len(head) < len(texts[i])]
            cap *= 4
        return [min(n, max_tokens + 1) for n in counts]

    def cut(
        self, kids: Sequence[Any], pending: int, pending_tokens: int, depth: int
    ) -> tuple[list[tuple[int, int]], int, int]:
        """Cut nodes too long for one block at statement boundaries.

        ``pending`` is where the text not yet emitted starts (``pending_tokens`` its tokens, counted
        by its parts); it grows over the nodes that fit after it. A node that does not fit after it is
        opened when it spans lines (a compound statement, a multi-line call), has braces, follows
        only comments, or is too long alone; between a node's own braces every statement is a block
        of its own. Returns the blocks emitted (byte spans) and the text still pending (start,
        tokens), which the caller continues.
        """
        max_tokens, prelude = self.max_tokens, self.src.prelude
        spans: list[tuple[int, int]] = []
        counts = self.sizes([(k.start_byte, k.end_byte) for k in kids])
        opening, closing = braces(kids)
        if opening is not None and (closing is None or closing <= opening + 1):
            opening = None  # no statements between braces of its own
        commented = False  # the pending text is only comments and attributes
        i = 0
        while i < len(kids):
            kid, tokens = kids[i], counts[i]
            if i == opening:
                spans.append((pending, kid.end_byte))  # the header through its opening brace
                groups = self.src.groups(flatten(kids[i + 1 : closing]))
                sizes = self.sizes([(g[0].start_byte, g[-1].end_byte) for g in groups])
                for group, size in zip(groups, sizes):
                    start, end = group[0].start_byte, group[-1].end_byte
                    if size <= max_tokens or depth >= MAX_DEPTH:
                        spans.append((start, end))
                    else:
                        inner, tail, _ = self.cut(group, start, 0, depth + 1)
                        spans.extend(inner)
                        spans.append((tail, end))
                pending, pending_tokens = kids[closing].start_byte, 0
                i = closing
                continue
            if pending_tokens + tokens <= max_tokens:
                commented = kid.type in prelude and (commented or not pending_tokens)
                pending_tokens += tokens
            elif kid.child_count and depth < MAX_DEPTH and (tokens > max_tokens or commented or self._compound(kid)):
                # a doc comment stays with the start of what it documents
                inner, pending, pending_tokens = self.cut(kid.children, pending, pending_tokens, depth + 1)
                spans.extend(inner)
                commented = False
            else:
                if pending_tokens:
                    spans.append((pending, kid.start_byte))
                pending, pending_tokens = kid.start_byte, tokens
                commented = kid.type in prelude
            i += 1
        return spans, pending, pending_tokens

    def _compound(self, node: Any) -> bool:
        """Whether a node is worth opening rather than moved whole: it spans lines or has braces."""
        return self.src.data.find(b"\n", node.start_byte, node.end_byte) != -1 or any(
            k.type == "{" and not k.is_named for k in node.children)


def _leading_words(text: str, length: int) -> str:
    """At most ``length`` characters of ``text``, cut at whitespace (all of it when it is no longer)."""
    if len(text) <= length:
        return text
    cut = max(text.rfind(" ", 0, length), text.rfind("\n", 0, length), text.rfind("\t", 0, length))
    return text[:cut] if cut > 0 else text

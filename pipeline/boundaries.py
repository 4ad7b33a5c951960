"""Chunking's second stage: a section's blocks, and where its chunks end (content-defined cuts).

Blocks are a section's paragraphs; one too long for a chunk is split into sentences, then lines,
then words, then characters (see ``pipeline.chunking``). A section whose blocks fit one chunk is one
chunk. A longer one is cut where its content says, not where a packing from one end happens to
land, so that an edit moves only the cuts near it — the idea of content-defined chunking (a rolling
hash picks the cut points of a byte stream; here the candidates are the boundaries between blocks):

- every boundary between two blocks has a **key**: its kind (a blank line between the blocks beats
  a line break, which beats a sentence end or a space) and then a hash of the two blocks beside it;
- a boundary is a **cut** when its key is lower than the key of every other boundary within
  ``window_tokens(max_tokens)`` tokens of it (the section's start and end count as cuts, so no cut
  lies within that distance of them): whether a boundary is a cut depends on the text within one
  window around it, and two cuts are always more than a window apart;
- a stretch between two cuts that does not fit one chunk is split at its lowest key (leaving at
  least half a window on each side when it can), then again, until every piece fits.

So an edit changes the cuts within a window of it and the pieces of the stretches it touches;
every other chunk keeps its text (and its offsets, shifted by the edit's length).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.sections import FENCE

# A chunk holds at most CHARS_PER_TOKEN characters per token of the model's limit (2,032 for 254):
# English averages about 4 characters per token; 2 of the PEPs' 19,546 chunks had more than 8.
CHARS_PER_TOKEN = 8
# No token of real text stands for more characters, whitespace aside: a span read as fewer tokens
# holds a word the tokenizer gave up on (WordPiece reads a word over 100 characters as one [UNK]).
MAX_TOKEN_CHARS = 32
# Content-defined cuts are more than max_tokens // CUT_WINDOW_DIVISOR tokens apart.
CUT_WINDOW_DIVISOR = 4
# Rounds of joining two neighbouring stretches that fit one chunk (fuller chunks, a slightly wider
# reach of an edit): one in structured documents, whose sections bound an edit anyway; none in text
# without headings, where nothing else does.
MERGE_ROUNDS = 1


class TokenCounter(Protocol):
    """Counts tokens the way the embedding model will see them (without special tokens)."""

    name: str

    def count(self, texts: Sequence[str]) -> list[int]: ...


def max_chars_for(max_tokens: int) -> int:
    """The most characters a chunk of a model with this token limit holds."""
    return CHARS_PER_TOKEN * max_tokens


def window_tokens(max_tokens: int) -> int:
    """How far apart (in tokens) content-defined cuts are at least: the window a cut's key is the
    lowest in."""
    return max(1, max_tokens // CUT_WINDOW_DIVISOR)


_BLANK_RUN = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"\S+")


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def paragraphs(text: str, start: int, end: int, fmt: str) -> list[tuple[int, int]]:
    """Blank-line separated spans of text[start:end]; Markdown code fences are not split."""
    spans: list[tuple[int, int]] = []
    pos = start
    fence_open = False
    for m in _BLANK_RUN.finditer(text, start, end):
        if fmt == "markdown":
            segment = text[pos : m.start()]
            for line in segment.split("\n"):
                if FENCE.match(line):
                    fence_open = not fence_open
            if fence_open:
                continue
        _keep(spans, text, pos, m.start())
        pos = m.end()
    _keep(spans, text, pos, end)
    return spans


def _keep(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    """Append the span of text[start:end] without its surrounding whitespace, unless that is empty."""
    span = _trimmed(text, start, end)
    if span:
        spans.append(span)


def _split_by(pattern: re.Pattern[str] | str, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] after each match of pattern (newline when pattern is '\\n')."""
    spans: list[tuple[int, int]] = []
    pos = start
    if isinstance(pattern, str):
        cut = text.find(pattern, start, end)
        while cut != -1:
            _keep(spans, text, pos, cut)
            pos = cut + 1
            cut = text.find(pattern, pos, end)
    else:
        for m in pattern.finditer(text, start, end):
            _keep(spans, text, pos, m.start())
            pos = m.end()
    _keep(spans, text, pos, end)
    return spans


@dataclass
class Atom:
    start: int
    end: int
    tokens: int


def _reads_as_few_tokens(text: str, tokens: int) -> bool:
    """Whether the tokenizer reads ``text`` as fewer than one token per MAX_TOKEN_CHARS characters,
    whitespace aside (indented code is fine): it holds a word too long for it, read as [UNK]."""
    return tokens > 0 and len("".join(text.split())) > MAX_TOKEN_CHARS * tokens


class Cutter:
    """Splits oversized spans: sentences, then lines, then words, then characters."""

    def __init__(self, text: str, counter: TokenCounter, max_tokens: int) -> None:
        self.text = text
        self.counter = counter
        self.max_tokens = max_tokens
        self.max_chars = max_chars_for(max_tokens)

    def fits(self, start: int, end: int, tokens: int) -> bool:
        """Whether text[start:end] of ``tokens`` tokens is one chunk's worth, or must be split."""
        if tokens > self.max_tokens or end - start > self.max_chars:
            return False
        # text has far fewer than MAX_TOKEN_CHARS characters per token even with its whitespace
        return end - start <= MAX_TOKEN_CHARS * tokens or not _reads_as_few_tokens(self.text[start:end], tokens)

    def joinable(self, left: Sequence[Atom], right: Sequence[Atom], tokens: int) -> bool:
        """Whether one chunk may hold the atoms ``left`` then ``right``, ``tokens`` in all.

        Atoms that touch are pieces of one unbroken run (nothing else is cut without whitespace
        between): joining them would make the run too long for the tokenizer again.
        """
        return (tokens <= self.max_tokens and right[-1].end - left[0].start <= self.max_chars
                and left[-1].end < right[0].start)

    def atoms(self, spans: list[tuple[int, int]], level: int = 0) -> list[Atom]:
        counts = self.counter.count([self.text[s:e] for s, e in spans])
        out: list[Atom] = []
        for (s, e), tokens in zip(spans, counts):
            if self.fits(s, e, tokens):
                out.append(Atom(s, e, tokens))
            else:
                out.extend(self.split(s, e, level))
        return out

    def split(self, start: int, end: int, level: int = 0) -> list[Atom]:
        splitters: list[re.Pattern[str] | str] = [_SENTENCE_END, "\n"]
        while level < len(splitters):
            pieces = _split_by(splitters[level], self.text, start, end)
            level += 1
            if len(pieces) > 1:  # sentences and lines stay apart: the section's cuts choose among them
                return self.atoms(pieces, level)
        words = [(m.start(), m.end()) for m in _WORD.finditer(self.text, start, end)]
        if len(words) > 1:
            return self._pack(self.atoms(words, len(splitters)))
        return self._characters(start, end)

    def _pack(self, atoms: list[Atom]) -> list[Atom]:
        """Greedily merge the words of one oversized line back up to the limit."""
        packed: list[Atom] = []
        for atom in atoms:
            if packed and self.joinable(packed[-1:], [atom], packed[-1].tokens + atom.tokens):
                packed[-1] = Atom(packed[-1].start, atom.end, packed[-1].tokens + atom.tokens)
            else:
                packed.append(atom)
        return packed

    def _characters(self, start: int, end: int) -> list[Atom]:
        """Cut one unbroken run into pieces within the limits, each read by the tokenizer as real tokens."""
        out: list[Atom] = []
        length = self.max_chars
        while start < end:
            # pieces are never joined again, so each is as long as fits; the next one starts a little
            # longer than the last, so a long run costs about two counts per piece
            length = min(end - start, self.max_chars, length + length // 4 + 1)
            while True:
                tokens = self.counter.count([self.text[start : start + length]])[0]
                if self.fits(start, start + length, tokens) or length == 1:
                    break
                length = max(1, int(length * 0.8))
            out.append(Atom(start, start + length, tokens))
            start += length
        return out




# -- cuts --------------------------------------------------------------------------------------

_FORCED = (-1, 0)  # between two pieces of one unbroken run: always a cut (they are never joined)


def _boundary_key(text: str, left: Atom, right: Atom) -> tuple[int, int]:
    """The key of the boundary between two blocks: its kind, then a hash of the blocks beside it."""
    if left.end >= right.start:
        return _FORCED
    between = text[left.end : right.start]
    kind = 0 if between.count("\n") >= 2 else 1 if "\n" in between else 2
    digest = hashlib.blake2b(f"{text[left.start:left.end]}\0{text[right.start:right.end]}".encode(), digest_size=8)
    return kind, int.from_bytes(digest.digest(), "big")


def _content_cuts(keys: list[tuple[int, int]], ends: list[int], total: int, window: int) -> list[int]:
    """Indexes i (1..n-1: the boundary before block i) whose key is the lowest within ``window``
    tokens; ``ends[i]`` is the token position of boundary i, the section's edges are cuts."""
    cuts: list[int] = []
    lo = 1
    for i in range(1, len(keys)):
        if keys[i] == _FORCED:
            cuts.append(i)
            continue
        at = ends[i]
        if at <= window or total - at <= window:
            continue
        while ends[lo] < at - window:
            lo += 1
        j = lo
        lowest = True
        while j < len(keys) and ends[j] <= at + window:
            if j != i and keys[j] <= keys[i]:
                lowest = False
                break
            j += 1
        if lowest:
            cuts.append(i)
    return cuts


def cut_runs(
    text: str, atoms: list[Atom], cutter: Cutter, merge_rounds: int = MERGE_ROUNDS,
) -> list[tuple[list[Atom], int]]:
    """Group a section's blocks into chunks (blocks, tokens) within the cutter's limits; a section
    that fits one chunk is one chunk, a longer one is cut by content (see the module docstring),
    then ``merge_rounds`` rounds join neighbouring stretches that fit one chunk together."""
    if not atoms:
        return []
    tokens = sum(a.tokens for a in atoms)
    if len(atoms) == 1 or cutter.joinable(atoms[:1], atoms[1:], tokens) and all(
            a.end < b.start for a, b in zip(atoms, atoms[1:])):
        return [(atoms, tokens)]
    keys = [_FORCED] + [_boundary_key(text, a, b) for a, b in zip(atoms, atoms[1:])]
    ends = [0] * len(atoms)
    for i in range(1, len(atoms)):
        ends[i] = ends[i - 1] + atoms[i - 1].tokens
    window = window_tokens(cutter.max_tokens)
    edges = [0, *_content_cuts(keys, ends, tokens, window), len(atoms)]
    for _ in range(merge_rounds):
        edges = _merge_round(atoms, keys, ends, edges, tokens, cutter)
    runs: list[tuple[list[Atom], int]] = []
    for lo, hi in zip(edges, edges[1:]):
        _split_stretch(atoms, keys, ends, lo, hi, cutter, window // 2, runs)
    return runs


def _merge_round(atoms: list[Atom], keys: list[tuple[int, int]], ends: list[int], edges: list[int], total: int,
                 cutter: Cutter) -> list[int]:
    """Drop each cut whose key is higher than both neighbouring cuts' when the two stretches beside
    it fit one chunk together: two neighbouring cuts are never both dropped, so each decision
    depends on the two stretches beside the cut alone."""
    def key(k: int) -> tuple[int, int]:
        return (-2, 0) if k in (0, len(edges) - 1) else keys[edges[k]]

    kept = [edges[0]]
    for k in range(1, len(edges) - 1):
        lo, cut, hi = edges[k - 1], edges[k], edges[k + 1]
        tokens = (ends[hi] if hi < len(ends) else total) - ends[lo]
        weakest = key(k) != _FORCED and key(k) > key(k - 1) and key(k) > key(k + 1)
        if not (weakest and cutter.joinable(atoms[lo:lo + 1], atoms[lo + 1:hi], tokens)):
            kept.append(cut)
    kept.append(edges[-1])
    return kept


def _split_stretch(
    atoms: list[Atom], keys: list[tuple[int, int]], ends: list[int], lo: int, hi: int, cutter: Cutter,
    margin: int, out: list[tuple[list[Atom], int]],
) -> None:
    """Append atoms[lo:hi] as one run if it fits, else split it into as few even pieces as its
    length needs, each cut at the lowest key within ``margin`` tokens of where it would fall."""
    tokens = sum(a.tokens for a in atoms[lo:hi])
    if hi - lo == 1 or cutter.joinable(atoms[lo:lo + 1], atoms[lo + 1:hi], tokens):
        out.append((atoms[lo:hi], tokens))
        return
    chars = atoms[hi - 1].end - atoms[lo].start
    pieces = max(2, -(-tokens // cutter.max_tokens), -(-chars // cutter.max_chars))
    start = ends[lo]
    target = start + tokens * (pieces // 2) / pieces
    inner = range(lo + 1, hi)
    near = [i for i in inner if abs(ends[i] - target) <= margin]
    cut = min(near, key=lambda i: keys[i]) if near else min(inner, key=lambda i: abs(ends[i] - target))
    _split_stretch(atoms, keys, ends, lo, cut, cutter, margin, out)
    _split_stretch(atoms, keys, ends, cut, hi, cutter, margin, out)


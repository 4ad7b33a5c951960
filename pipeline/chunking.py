"""Chunking stage: cut a normalized document into structure-aware chunks sized in model tokens.

Pure functions only: given the same text, format, token counter and limit, the chunks are the same.

How a document is cut:

1. **Sections** follow the document's structure: Markdown and reStructuredText headings (each
   chunk carries its heading path), Python top-level functions and classes (``ast``), JavaScript,
   TypeScript, Go, Rust and Java declarations and their methods (tree-sitter, see
   ``pipeline.codechunks``, which also gives a code file's blocks: whole statements), one section
   for plain text. A section that holds only its heading is merged into the next one.
2. **Blocks** are a section's paragraphs (blank-line separated; a fenced code block stays whole).
   A block longer than the limit is split into sentences, a sentence longer than the limit into
   lines, then words, then characters — so text is never cut mid-sentence unless one sentence
   exceeds the limit. The limit is in tokens and in characters: a chunk holds at most
   ``CHARS_PER_TOKEN`` characters per token of the model's limit, so text the tokenizer reads as few
   tokens (a 191 KB unbroken string is one ``[UNK]`` to a WordPiece tokenizer) still makes chunks
   of bounded size. A span the tokenizer reads as fewer than one token per ``MAX_TOKEN_CHARS``
   characters holds a word too long for it (read as one unknown token): it is split down to that
   word, which is cut into pieces short enough to be read as real tokens, never joined again.
3. **Packing** fills each section's chunks from the section's end, so every boundary inside a
   section depends on that section's text alone; the section's first, short run then joins the
   previous chunk when both fit the limit together (small sections share a chunk instead of
   making many tiny ones). An edit inside one section therefore changes that section's chunks and
   at most the join decisions up to the next section that needs several chunks; boundaries
   anywhere else stay where they were. A chunk's heading path is that of the section it starts in.
   In source code only a section that fits one chunk joins the previous one, so that a long
   function's signature leads a chunk under its own name.
4. **Context**: when the document has a title (``metadata["title"]``), every chunk is embedded and
   BM25-indexed as ``title + "\n\n" + chunk text`` (unless the chunk already begins with the title),
   so a later chunk of a long document still says what the document is about. The chunk's own text
   and character offsets stay those of the source, and the chunk alone still fits the limit: the
   title does not shrink the budget (that would cut more documents into more chunks, each embedded
   and stored). When title and a full chunk together exceed the model's window, the model sees the
   title and the start of the chunk; BM25 indexes all of it. A title longer than an eighth of the
   limit is left out. The chunk hash covers what is embedded, so a new title re-embeds exactly the
   chunks it precedes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.formats import PageRange
from pipeline.codechunks import CODE_FORMATS, code_layout
from pipeline.hashing import chunk_id_for, sha256_hex
from pipeline.sources import SourceDocument
from retrieval.artifacts import indexed_text  # the chunk table's definition of what a chunk is indexed as

CHUNKER_ALGORITHM = "sections-v2"
# A chunk holds at most CHARS_PER_TOKEN characters per token of the model's limit (2,032 for 254):
# English averages about 4 characters per token; 2 of the PEPs' 19,546 chunks had more than 8.
CHARS_PER_TOKEN = 8
# No token of real text stands for more characters, whitespace aside: a span read as fewer tokens
# holds a word the tokenizer gave up on (WordPiece reads a word over 100 characters as one [UNK]).
MAX_TOKEN_CHARS = 32


class TokenCounter(Protocol):
    """Counts tokens the way the embedding model will see them (without special tokens)."""

    name: str

    def count(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """One chunk placement with its attribution."""

    doc_id: str
    chunk_id: str
    chunk_hash: str
    ordinal: int
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    token_count: int
    text: str
    context: str = ""  # the document title the chunk is indexed with ("" when none)
    pages: PageRange | None = None  # the physical pages (and their labels) it spans; None: no pages

    @property
    def indexed_text(self) -> str:
        """What the embedding model and BM25 see."""
        return indexed_text(self.context, self.text)


MAX_CONTEXT_CHARS = 200


def chunk_context(metadata: dict[str, object]) -> str:
    """The context line of a document's chunks: its title, whitespace-collapsed, at most 200 characters."""
    title = metadata.get("title")
    if not isinstance(title, str):
        return ""
    return " ".join(title.split())[:MAX_CONTEXT_CHARS]


@dataclass(frozen=True)
class Section:
    heading_path: tuple[str, ...]
    start: int
    end: int
    body_start: int  # first character after the heading line(s); == start when there is no heading


def max_chars_for(max_tokens: int) -> int:
    """The most characters a chunk of a model with this token limit holds."""
    return CHARS_PER_TOKEN * max_tokens


def chunker_version(tokenizer_name: str, max_tokens: int, passage_prefix: str = "") -> str:
    """Identify everything that decides where chunks fall and what is embedded; a change re-chunks
    every document."""
    passage = f";passage={sha256_hex(passage_prefix)[:12]}" if passage_prefix else ""
    return (f"{CHUNKER_ALGORITHM};tokenizer={tokenizer_name};max_tokens={max_tokens}"
            f";max_chars={max_chars_for(max_tokens)};max_token_chars={MAX_TOKEN_CHARS}{passage}")


# -- sections ----------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
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
        m = _FENCE.match(line)
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


# -- blocks ------------------------------------------------------------------------------------

_BLANK_RUN = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"\S+")


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _paragraphs(text: str, start: int, end: int, fmt: str) -> list[tuple[int, int]]:
    """Blank-line separated spans of text[start:end]; Markdown code fences are not split."""
    spans: list[tuple[int, int]] = []
    pos = start
    fence_open = False
    for m in _BLANK_RUN.finditer(text, start, end):
        if fmt == "markdown":
            segment = text[pos : m.start()]
            for line in segment.split("\n"):
                if _FENCE.match(line):
                    fence_open = not fence_open
            if fence_open:
                continue
        span = _trimmed(text, pos, m.start())
        if span:
            spans.append(span)
        pos = m.end()
    span = _trimmed(text, pos, end)
    if span:
        spans.append(span)
    return spans


def _split_by(pattern: re.Pattern[str] | str, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] after each match of pattern (newline when pattern is '\\n')."""
    spans: list[tuple[int, int]] = []
    pos = start
    if isinstance(pattern, str):
        cut = text.find(pattern, start, end)
        while cut != -1:
            span = _trimmed(text, pos, cut)
            if span:
                spans.append(span)
            pos = cut + 1
            cut = text.find(pattern, pos, end)
    else:
        for m in pattern.finditer(text, start, end):
            span = _trimmed(text, pos, m.start())
            if span:
                spans.append(span)
            pos = m.end()
    span = _trimmed(text, pos, end)
    if span:
        spans.append(span)
    return spans


@dataclass
class _Atom:
    start: int
    end: int
    tokens: int


def _reads_as_few_tokens(text: str, tokens: int) -> bool:
    """Whether the tokenizer reads ``text`` as fewer than one token per MAX_TOKEN_CHARS characters,
    whitespace aside (indented code is fine): it holds a word too long for it, read as [UNK]."""
    return tokens > 0 and len("".join(text.split())) > MAX_TOKEN_CHARS * tokens


class _Cutter:
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

    def joinable(self, left: Sequence[_Atom], right: Sequence[_Atom], tokens: int) -> bool:
        """Whether one chunk may hold the atoms ``left`` then ``right``, ``tokens`` in all.

        Atoms that touch are pieces of one unbroken run (nothing else is cut without whitespace
        between): joining them would make the run too long for the tokenizer again.
        """
        return (tokens <= self.max_tokens and right[-1].end - left[0].start <= self.max_chars
                and left[-1].end < right[0].start)

    def atoms(self, spans: list[tuple[int, int]], level: int = 0) -> list[_Atom]:
        counts = self.counter.count([self.text[s:e] for s, e in spans])
        out: list[_Atom] = []
        for (s, e), tokens in zip(spans, counts):
            if self.fits(s, e, tokens):
                out.append(_Atom(s, e, tokens))
            else:
                out.extend(self.split(s, e, level))
        return out

    def split(self, start: int, end: int, level: int = 0) -> list[_Atom]:
        splitters: list[re.Pattern[str] | str] = [_SENTENCE_END, "\n"]
        while level < len(splitters):
            pieces = _split_by(splitters[level], self.text, start, end)
            level += 1
            if len(pieces) > 1:
                return self._pack(self.atoms(pieces, level))
        words = [(m.start(), m.end()) for m in _WORD.finditer(self.text, start, end)]
        if len(words) > 1:
            return self._pack(self.atoms(words, len(splitters)))
        return self._characters(start, end)

    def _pack(self, atoms: list[_Atom]) -> list[_Atom]:
        """Greedily merge consecutive pieces of one oversized span back up to the limit."""
        packed: list[_Atom] = []
        for atom in atoms:
            if packed and self.joinable(packed[-1:], [atom], packed[-1].tokens + atom.tokens):
                packed[-1] = _Atom(packed[-1].start, atom.end, packed[-1].tokens + atom.tokens)
            else:
                packed.append(atom)
        return packed

    def _characters(self, start: int, end: int) -> list[_Atom]:
        """Cut one unbroken run into pieces within the limits, each read by the tokenizer as real tokens."""
        out: list[_Atom] = []
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
            out.append(_Atom(start, start + length, tokens))
            start += length
        return out


# -- packing -----------------------------------------------------------------------------------


def chunk_document(doc: SourceDocument, counter: TokenCounter, max_tokens: int, passage_prefix: str = "") -> list[Chunk]:
    """Cut one document into chunks of at most ``max_tokens`` tokens and ``max_chars_for(max_tokens)`` characters.

    Args:
        doc: the document (normalized text; ``format`` picks the section splitter).
        counter: the embedding model's token counter.
        max_tokens: the most tokens a chunk may hold (the model's sequence length less special tokens).
        passage_prefix: what the model sees before each chunk (an e5 model's ``passage: ``): part of
            the chunk hash, which covers what is embedded.

    Returns:
        Chunks in document order with ordinals 0..n-1; empty when the document has no text.
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    text = doc.text
    context = chunk_context(doc.metadata)
    if context and counter.count([context])[0] > max_tokens // 8:
        context = ""  # a title this long would crowd out the chunk's own text
    cutter = _Cutter(text, counter, max_tokens)
    layout = code_layout(text, doc.format, counter, max_tokens, doc.doc_id) if doc.format in CODE_FORMATS else None
    if layout is not None:  # a code file's blocks are its statements; a file that does not parse is plain text
        sections, section_spans = [Section(*s) for s in layout.sections], layout.blocks
        counter = layout.counter or counter  # it remembers the blocks' counts
    else:
        sections = split_sections(text, "text") if doc.format in CODE_FORMATS else document_sections(doc)
        section_spans = [_paragraphs(text, s.start, s.end, doc.format) for s in sections]
    flat = [span for spans in section_spans for span in spans]
    counts = counter.count([text[s:e] for s, e in flat]) if flat else []

    groups: list[tuple[tuple[str, ...], list[_Atom]]] = []
    carried: list[_Atom] = []  # a heading-only section joins the next section
    k = 0
    for section, spans in zip(sections, section_spans):
        atoms: list[_Atom] = []
        for s, e in spans:
            tokens = counts[k]
            k += 1
            atoms.extend([_Atom(s, e, tokens)] if cutter.fits(s, e, tokens) else cutter.split(s, e))
        heading_only = all(a.start < section.body_start for a in atoms) and section.body_start > section.start
        if heading_only and atoms:
            carried.extend(atoms)
            continue
        groups.append((section.heading_path, carried + atoms))
        carried = []
    if carried:
        groups.append((sections[-1].heading_path, carried))

    pieces: list[tuple[tuple[str, ...], list[_Atom], int]] = []  # (heading path, atoms, tokens)
    for heading_path, atoms in groups:
        if not atoms:
            continue
        runs = _pack_from_end(atoms, cutter)
        head_atoms, head_tokens = runs[0]
        if (pieces and cutter.joinable(pieces[-1][1], head_atoms, pieces[-1][2] + head_tokens)
                and (layout is None or len(runs) == 1)):
            # the section's short first run joins the previous section's last chunk; a code declaration
            # that needs several chunks starts its own, so that its signature leads a chunk under its name
            path, joined, tokens = pieces[-1]
            pieces[-1] = (path, joined + head_atoms, tokens + head_tokens)
            runs = runs[1:]
        pieces.extend((heading_path, run_atoms, run_tokens) for run_atoms, run_tokens in runs)
    return [_make_chunk(doc, i, path, atoms, tokens, context, passage_prefix)
            for i, (path, atoms, tokens) in enumerate(pieces)]


def _pack_from_end(atoms: list[_Atom], cutter: _Cutter) -> list[tuple[list[_Atom], int]]:
    """Pack a section's atoms into runs within the cutter's limits, filling from the section's end.

    Filling from the end makes every boundary inside the section depend on the section's own text
    only; the one short run is the first, which may then join the previous section's last chunk.
    """
    runs: list[tuple[list[_Atom], int]] = []
    current: list[_Atom] = []
    tokens = 0
    for atom in reversed(atoms):
        # current is the run last atom first: current[-1] begins it, current[0] ends it
        if current and not cutter.joinable((atom,), (current[-1], current[0]), tokens + atom.tokens):
            runs.append((current[::-1], tokens))
            current, tokens = [], 0
        current.append(atom)
        tokens += atom.tokens
    runs.append((current[::-1], tokens))
    return runs[::-1]


def _make_chunk(
    doc: SourceDocument, ordinal: int, heading_path: tuple[str, ...], atoms: list[_Atom], tokens: int, context: str,
    passage_prefix: str = "",
) -> Chunk:
    start, end = atoms[0].start, atoms[-1].end
    text = doc.text[start:end]
    context = context if indexed_text(context, text) != text else ""
    chunk_hash = sha256_hex(passage_prefix + indexed_text(context, text))
    pages = doc.layout.pages_of(start, end) if doc.layout is not None else None
    return Chunk(
        doc_id=doc.doc_id,
        chunk_id=chunk_id_for(doc.doc_id, ordinal, heading_path, start, end, chunk_hash,
                              pages=None if pages is None else (pages.start, pages.end, pages.label_start,
                                                                pages.label_end)),
        chunk_hash=chunk_hash,
        ordinal=ordinal,
        heading_path=heading_path,
        char_start=start,
        char_end=end,
        token_count=tokens,
        text=text,
        context=context,
        pages=pages,
    )


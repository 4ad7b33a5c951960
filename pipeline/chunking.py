"""Chunking stage: cut a normalized document into structure-aware chunks sized in model tokens.

Pure functions only: given the same text, format, token counter and limit, the chunks are the same.

How a document is cut:

1. **Sections** follow the document's structure (``pipeline.sections``): Markdown and
   reStructuredText headings (each chunk carries its heading path), Python top-level functions and
   classes (``ast``), JavaScript, TypeScript, Go, Rust and Java declarations and their methods
   (tree-sitter, see ``pipeline.code``, which also gives a code file's blocks: whole
   statements), a PDF's, DOCX's or HTML page's headings as its extractor found them, one section for
   plain text. A section that holds only its heading is merged into the next one.
2. **Blocks** are a section's paragraphs (blank-line separated; a fenced code block stays whole).
   A block longer than the limit is split into sentences, a sentence longer than the limit into
   lines, then words, then characters — so text is never cut mid-sentence unless one sentence
   exceeds the limit. The limit is in tokens and in characters: a chunk holds at most
   ``CHARS_PER_TOKEN`` characters per token of the model's limit, so text the tokenizer reads as few
   tokens (a 191 KB unbroken string is one ``[UNK]`` to a WordPiece tokenizer) still makes chunks
   of bounded size. A span the tokenizer reads as fewer than one token per ``MAX_TOKEN_CHARS``
   characters holds a word too long for it (read as one unknown token): it is split down to that
   word, which is cut into pieces short enough to be read as real tokens, never joined again.
3. **Cuts** (``pipeline.boundaries``): a section that fits one chunk is one chunk; a longer one —
   all of a heading-less text, most PDF text — is cut at content-defined boundaries between its
   blocks, chosen by a hash of the text beside them (paragraph breaks first), so that an edit moves
   only the cuts within a window of it: the chunks elsewhere keep their text. A section's first
   chunk joins the previous section's last one when both fit the limit together (small sections
   share a chunk instead of making many tiny ones). A chunk's heading path is that of the section
   it starts in. In source code only a section that fits one chunk joins the previous one, so that
   a long function's signature leads a chunk under its own name.
4. **Context**: every chunk is embedded and BM25-indexed as its context line, a blank line, then
   its text. The context line is the document's title (``metadata["title"]``) and the chunk's
   heading path, ``title > section > subsection``, so a chunk deep in a long document still says
   what it is about (``context="title"`` keeps the title only, ``"none"`` neither). A chunk that
   begins with its context line gets none; one that opens with its section's heading line gets the
   path above it. The chunk's own text and character offsets stay those of
   the source, and the chunk alone still fits the limit: the context does not shrink the budget
   (that would cut more documents into more chunks, each embedded and stored). The line holds at
   most an eighth of the limit: longer, it keeps the title and the innermost heading, then the
   headings alone, then the innermost heading, then the title, else nothing. When context and a
   full chunk together exceed the model's window, the model sees the context and the start of the
   chunk; BM25 indexes all of it. The chunk hash covers what is embedded, so a new title or a
   renamed heading re-embeds exactly the chunks it precedes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.boundaries import (
    CHARS_PER_TOKEN, CUT_WINDOW_DIVISOR, MAX_TOKEN_CHARS, MERGE_ROUNDS, Atom, Cutter, TokenCounter, cut_runs,
    max_chars_for, paragraphs,
)
from pipeline.code import CODE_FORMATS, code_layout
from pipeline.formats import PageRange
from pipeline.hashing import chunk_id_for, sha256_hex
from pipeline.sections import Section, document_sections, split_sections
from pipeline.sources import SourceDocument
from retrieval.artifacts import indexed_text  # the chunk table's definition of what a chunk is indexed as

__all__ = [
    "CHARS_PER_TOKEN", "CHUNKER_ALGORITHM", "CONTEXT_MODES", "MAX_TOKEN_CHARS", "Chunk", "Section", "TokenCounter",
    "chunk_context", "chunk_document", "chunker_version", "context_line", "document_sections", "max_chars_for",
    "split_sections",
]

CHUNKER_ALGORITHM = "sections-v3"  # v3: content-defined cuts inside sections longer than one chunk
CONTEXT_MODES = ("headings", "section", "title", "none")  # what a chunk is indexed with besides its text
DEFAULT_CONTEXT = "section"  # the fewest characters embedded for most of the gain: see docs/benchmarks.md


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
    context: str = ""  # the context line the chunk is indexed with: title > heading path ("" when none)
    pages: PageRange | None = None  # the physical pages (and their labels) it spans; None: no pages

    @property
    def indexed_text(self) -> str:
        """What the embedding model and BM25 see."""
        return indexed_text(self.context, self.text)


MAX_CONTEXT_CHARS = 200
CONTEXT_SEPARATOR = " > "


def chunk_context(metadata: dict[str, object]) -> str:
    """A document's title as its chunks' context lines begin with it: whitespace-collapsed, at most
    200 characters; "" when it has none."""
    title = metadata.get("title")
    if not isinstance(title, str):
        return ""
    return " ".join(title.split())[:MAX_CONTEXT_CHARS]


def _context_candidates(title: str, heading_path: tuple[str, ...], mode: str) -> list[str]:
    """The context lines a chunk may carry, the fullest first (see the module docstring)."""
    if mode == "none":
        return [""]
    path = [" ".join(h.split())[:MAX_CONTEXT_CHARS] for h in heading_path] if mode in ("headings", "section") else []
    path = [h for h in path if h]
    if path and path[0] == title:  # an extractor's title is often the first heading too
        path = path[1:]
    if mode == "section":
        path = path[-1:]
    head = [title] if title else []
    candidates = [head + path, head + path[-1:], path, path[-1:], head]
    lines = [CONTEXT_SEPARATOR.join(c) for c in candidates]
    return list(dict.fromkeys(line for line in lines if line)) + [""]


def context_line(title: str, heading_path: tuple[str, ...], counter: TokenCounter, max_tokens: int,
                 mode: str = DEFAULT_CONTEXT) -> str:
    """The context line of a chunk under ``heading_path`` of a document titled ``title``: the fullest
    candidate of at most ``max_tokens // 8`` tokens."""
    candidates = _context_candidates(title, heading_path, mode)
    counts = counter.count(candidates[:-1]) if len(candidates) > 1 else []
    return next((c for c, n in zip(candidates, counts) if n <= max_tokens // 8), "")


def chunker_version(tokenizer_name: str, max_tokens: int, passage_prefix: str = "",
                    context: str = DEFAULT_CONTEXT) -> str:
    """Identify everything that decides where chunks fall and what is embedded; a change re-chunks
    every document."""
    if context not in CONTEXT_MODES:
        raise ValueError(f"chunk context {context!r} is not one of {', '.join(CONTEXT_MODES)}")
    passage = f";passage={sha256_hex(passage_prefix)[:12]}" if passage_prefix else ""
    return (f"{CHUNKER_ALGORITHM};tokenizer={tokenizer_name};max_tokens={max_tokens}"
            f";max_chars={max_chars_for(max_tokens)};max_token_chars={MAX_TOKEN_CHARS}"
            f";cut_window=1/{CUT_WINDOW_DIVISOR};context={context}{passage}")


# -- packing -----------------------------------------------------------------------------------


def chunk_document(doc: SourceDocument, counter: TokenCounter, max_tokens: int, passage_prefix: str = "",
                   context: str = DEFAULT_CONTEXT) -> list[Chunk]:
    """Cut one document into chunks of at most ``max_tokens`` tokens and ``max_chars_for(max_tokens)`` characters.

    Args:
        doc: the document (normalized text; ``format`` picks the section splitter).
        counter: the embedding model's token counter.
        max_tokens: the most tokens a chunk may hold (the model's sequence length less special tokens).
        passage_prefix: what the model sees before each chunk (an e5 model's ``passage: ``): part of
            the chunk hash, which covers what is embedded.
        context: what each chunk is indexed with besides its text: ``"section"`` (title and the
            innermost heading), ``"headings"`` (title and the whole heading path), ``"title"`` or ``"none"``.

    Returns:
        Chunks in document order with ordinals 0..n-1; empty when the document has no text.

    Raises:
        ValueError: ``max_tokens`` below 8 or an unknown ``context``.
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    if context not in CONTEXT_MODES:
        raise ValueError(f"chunk context {context!r} is not one of {', '.join(CONTEXT_MODES)}")
    text = doc.text
    cutter = Cutter(text, counter, max_tokens)
    layout = code_layout(text, doc.format, counter, max_tokens, doc.doc_id) if doc.format in CODE_FORMATS else None
    if layout is not None:  # a code file's blocks are its statements; a file that does not parse is plain text
        sections, section_spans = [Section(*s) for s in layout.sections], layout.blocks
        counter = layout.counter or counter  # it remembers the blocks' counts
    else:
        sections = split_sections(text, "text") if doc.format in CODE_FORMATS else document_sections(doc)
        section_spans = [paragraphs(text, s.start, s.end, doc.format) for s in sections]
    flat = [span for spans in section_spans for span in spans]
    counts = counter.count([text[s:e] for s, e in flat]) if flat else []

    merge_rounds = MERGE_ROUNDS if any(s.heading_path for s in sections) else 0  # see pipeline.boundaries
    groups: list[tuple[tuple[str, ...], list[Atom]]] = []
    carried: list[Atom] = []  # a heading-only section joins the next section
    k = 0
    for section, spans in zip(sections, section_spans):
        atoms: list[Atom] = []
        for s, e in spans:
            tokens = counts[k]
            k += 1
            atoms.extend([Atom(s, e, tokens)] if cutter.fits(s, e, tokens) else cutter.split(s, e))
        heading_only = all(a.start < section.body_start for a in atoms) and section.body_start > section.start
        if heading_only and atoms:
            carried.extend(atoms)
            continue
        groups.append((section.heading_path, carried + atoms))
        carried = []
    if carried:
        groups.append((sections[-1].heading_path, carried))

    pieces: list[tuple[tuple[str, ...], list[Atom], int]] = []  # (heading path, atoms, tokens)
    open_last = False  # whether the last piece is a section (or sections) of one chunk, which may take the next
    for heading_path, atoms in groups:
        if not atoms:
            continue
        runs = cut_runs(text, atoms, cutter, merge_rounds)
        head_atoms, head_tokens = runs[0]
        if (open_last and cutter.joinable(pieces[-1][1], head_atoms, pieces[-1][2] + head_tokens)
                and (layout is None or len(runs) == 1)):
            # the section's first chunk joins the previous small section's chunk; a code declaration that
            # needs several chunks starts its own, so that its signature leads a chunk under its name
            path, joined, tokens = pieces[-1]
            pieces[-1] = (path, joined + head_atoms, tokens + head_tokens)
            runs = runs[1:]
        pieces.extend((heading_path, run_atoms, run_tokens) for run_atoms, run_tokens in runs)
        open_last = len(runs) <= 1  # the last chunk of a long section was cut by content: it stays whole
    title = chunk_context(doc.metadata)
    lines: dict[tuple[str, ...], str] = {}
    placed = []
    for path, atoms, tokens in pieces:
        # a chunk that opens with its section's heading line says that heading already
        own = path[:-1] if path and _opens_with(text[atoms[0].start : atoms[-1].end], path[-1]) else path
        if own not in lines:
            lines[own] = context_line(title, own, counter, max_tokens, context)
        placed.append((path, atoms, tokens, lines[own]))
    return [_make_chunk(doc, i, path, atoms, tokens, line, passage_prefix)
            for i, (path, atoms, tokens, line) in enumerate(placed)]


def _opens_with(text: str, heading: str) -> bool:
    """Whether ``text``'s first line is the heading (Markdown's ``#`` marks aside)."""
    first = text.split("\n", 1)[0].strip().lstrip("#").strip().rstrip("#").strip()
    return bool(heading) and " ".join(first.split()) == " ".join(heading.split())


def _make_chunk(
    doc: SourceDocument, ordinal: int, heading_path: tuple[str, ...], atoms: list[Atom], tokens: int, context: str,
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


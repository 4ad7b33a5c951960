"""Chunking stage, source code: a code file's sections and statement blocks, from its tree-sitter parse tree.

JavaScript, TypeScript (and TSX), Go, Rust and Java; ``pipeline.chunking`` packs the blocks into
chunks. Pure functions over the parse tree: given the same text, grammar versions, token counter
and limit, the layout is the same. What it produces follows the Python chunker's contract:

- **Sections** are the file's declarations in order. A top-level function, type, constant or macro
  is one section with its name as heading path. A class, interface, trait, ``impl``, enum with
  methods, namespace or ``mod`` is a header section (its signature up to the opening brace, and the
  fields or other member-level code before its first member) followed by one section per member
  under the enclosing names, nested as deep as the code is: ``("UserService", "find")`` for a Java
  or TypeScript method, ``("Parser", "parse_header")`` for a function of Rust's ``impl Parser``,
  ``("Display for Error", "fmt")`` for a trait impl, ``("Server", "Handle")`` for a Go method
  (its receiver type is its enclosing name). Code between declarations (imports, statements,
  fields between methods) is a section of its own under the enclosing names (``()`` at module
  level), so nothing moves out of order. A header section that holds only its signature joins its
  first member, as a Markdown heading joins its first paragraph.
- **Comments, doc comments, Rust attributes and TypeScript member decorators** belong to the
  declaration they precede when no blank line separates them from it (attributes and decorators
  always do); a comment at the end of a line belongs to that line.
- **Blocks** (what the packer fills chunks with) are whole declarations and member-level
  statements. One longer than the token limit is cut at statement boundaries: its header up to the
  opening brace, then each statement of its body, descending into a statement only when that one
  does not fit (or does not fit after what precedes it), so cuts fall between the outermost
  statements that allow it. A single token longer than the limit (a long string) is left to the
  text cutter (sentences, lines, words).
- **A file with syntax errors** (tree-sitter error or missing nodes) has no layout: the caller
  chunks it as plain text, and a warning names the document and the line of the first error.

Offsets are character offsets into the text (tree-sitter counts UTF-8 bytes; they are converted),
and the blocks cover every non-whitespace character of the file in order, which is checked: a
layout that would lose text is refused like a parse error.

The package, one module per concern: ``grammars`` loads the tree-sitter grammars, parses and names
their versions; ``declarations`` says, per language family, which nodes are declarations and what
they are called; ``source`` maps byte offsets to characters and attaches comments; ``sections`` walks
the declarations into sections; ``blocks`` cuts a section's units into blocks within the token
limit; ``layout`` puts them together and checks that no text is lost.
"""

from __future__ import annotations

from pipeline.code.grammars import CODE_ALGORITHM, CODE_EXTENSIONS, CODE_FORMATS, GRAMMARS, Grammar, code_chunker_version
from pipeline.code.layout import CodeLayout, code_layout
from pipeline.code.sections import CodeSection

__all__ = [
    "CODE_ALGORITHM", "CODE_EXTENSIONS", "CODE_FORMATS", "GRAMMARS", "CodeLayout", "CodeSection", "Grammar",
    "code_chunker_version", "code_layout",
]

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
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from registry.extras import require

if TYPE_CHECKING:  # pipeline.chunking imports this module to dispatch code formats here
    from pipeline.chunking import TokenCounter

logger = logging.getLogger(__name__)

CODE_ALGORITHM = "code-v1"
_MAX_DEPTH = 200  # deeper syntax (generated code) is left whole for the text cutter; Python's stack is finite


def _javascript() -> Any:
    return require("tree_sitter_javascript", "pipeline", "chunking JavaScript").language()


def _typescript() -> Any:
    return require("tree_sitter_typescript", "pipeline", "chunking TypeScript").language_typescript()


def _tsx() -> Any:
    return require("tree_sitter_typescript", "pipeline", "chunking TSX").language_tsx()


def _go() -> Any:
    return require("tree_sitter_go", "pipeline", "chunking Go").language()


def _rust() -> Any:
    return require("tree_sitter_rust", "pipeline", "chunking Rust").language()


def _java() -> Any:
    return require("tree_sitter_java", "pipeline", "chunking Java").language()


@dataclass(frozen=True)
class Grammar:
    """The tree-sitter grammar one code format is parsed with."""

    language: str  # for people: "TypeScript"
    distribution: str  # the package that ships it; its version is part of each document's chunker version
    load: Callable[[], Any]
    family: str  # which declaration rules apply: "js", "go", "rust", "java"


GRAMMARS: dict[str, Grammar] = {
    "javascript": Grammar("JavaScript", "tree-sitter-javascript", _javascript, "js"),
    "typescript": Grammar("TypeScript", "tree-sitter-typescript", _typescript, "js"),
    "tsx": Grammar("TSX", "tree-sitter-typescript", _tsx, "js"),
    "go": Grammar("Go", "tree-sitter-go", _go, "go"),
    "rust": Grammar("Rust", "tree-sitter-rust", _rust, "rust"),
    "java": Grammar("Java", "tree-sitter-java", _java, "java"),
}
CODE_FORMATS = frozenset(GRAMMARS)

# the file extensions read as code, by format (``pipeline.sources.documents`` picks a document's format by them)
CODE_EXTENSIONS = {
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "tsx", ".go": "go", ".rs": "rust", ".java": "java",
}  # fmt: skip


@functools.cache
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"  # chunking such a file raises MissingExtra; the version only has to differ


def code_chunker_version(fmt: str) -> str:
    """What decides a code document's chunks beyond the chunker configuration: this module's algorithm
    and the versions of tree-sitter and of the format's grammar ("" for formats that are not code).
    Part of ``pipeline.diff.document_chunker``, so upgrading one grammar re-chunks that language's
    files and no others."""
    grammar = GRAMMARS.get(fmt)
    if grammar is None:
        return ""
    return (f";{CODE_ALGORITHM};tree-sitter={_version('tree-sitter')}"
            f";{grammar.distribution}={_version(grammar.distribution)}")


@functools.cache
def _language(fmt: str) -> Any:
    tree_sitter = require("tree_sitter", "pipeline", "chunking source code")
    return tree_sitter.Language(GRAMMARS[fmt].load())


def _parse(data: bytes, fmt: str) -> Any:
    tree_sitter = require("tree_sitter", "pipeline", "chunking source code")
    return tree_sitter.Parser(_language(fmt)).parse(data)  # a parser per call: parsers are not thread-safe


# -- declarations, per language family --------------------------------------------------------------

_PRELUDE = {  # what attaches to the declaration it precedes
    "js": {"comment", "decorator", "hash_bang_line"},
    "go": {"comment"},
    "rust": {"line_comment", "block_comment", "attribute_item"},
    "java": {"line_comment", "block_comment"},
}
_COMMENTS = {"comment", "line_comment", "block_comment", "hash_bang_line"}  # need adjacency to attach

_LEAVES = {
    "js": {"function_declaration", "generator_function_declaration", "function_signature", "method_definition",
           "method_signature", "abstract_method_signature", "enum_declaration", "type_alias_declaration"},
    "go": {"function_declaration", "method_elem"},
    "rust": {"function_item", "function_signature_item", "struct_item", "enum_item", "union_item", "type_item",
             "const_item", "static_item", "macro_definition"},
    "java": {"method_declaration", "constructor_declaration", "compact_constructor_declaration",
             "annotation_type_element_declaration"},
}
_CONTAINERS = {
    "js": {"class_declaration", "abstract_class_declaration", "class", "interface_declaration", "internal_module",
           "module"},
    "go": set(),
    "rust": {"trait_item", "impl_item", "mod_item"},
    "java": {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration",
             "annotation_type_declaration"},
}
_FUNCTION_VALUES = {"arrow_function", "function_expression", "function", "generator_function", "class"}
# nodes whose children are read as if they stood in their place: Java puts an enum's methods one level
# down, after its constants; Go wraps a block's statements in a list
_TRANSPARENT = {"enum_body_declarations", "statement_list"}


class _Decl(NamedTuple):
    names: tuple[str, ...]  # the heading path elements this declaration adds
    body: Any  # the node whose braces hold the members; None for a leaf


def _text(node: Any) -> str:
    return " ".join(node.text.decode("utf-8", "replace").split())


def _name(node: Any, default: str = "(anonymous)") -> str:
    name = node.child_by_field_name("name")
    return _text(name) if name is not None else default


def _type_name(node: Any) -> str:
    """A type's name without its path or type arguments: ``fmt::Debug`` → ``Debug``, ``Parser<'a>`` → ``Parser``."""
    while node is not None:
        if node.type in {"type_identifier", "primitive_type", "identifier", "field_identifier"}:
            return _text(node)
        if node.type == "generic_type":
            node = node.child_by_field_name("type")
        elif node.type == "scoped_type_identifier":
            node = node.child_by_field_name("name")
        elif node.named_child_count and node.type in {"pointer_type", "reference_type", "parameter_declaration",
                                                      "parenthesized_type", "qualified_type"}:
            node = node.child_by_field_name("type") or node.named_children[-1]
        else:
            return _text(node)
    return "(anonymous)"


def _declaration(node: Any, family: str) -> _Decl | None:
    """The declaration ``node`` is (with the names it adds to the heading path), or None for other code."""
    kind = node.type
    if family == "js":
        if kind == "export_statement":
            inner = node.child_by_field_name("declaration") or node.child_by_field_name("value")
            if inner is None:
                return None
            found = _declaration(inner, family)
            if found is None and inner.type in _FUNCTION_VALUES:
                return _Decl(("default",), inner.child_by_field_name("body") if inner.type == "class" else None)
            if found is not None and found.names == ("(anonymous)",):
                return found._replace(names=("default",))
            return found
        if kind in {"ambient_declaration", "expression_statement"}:
            inner = [c for c in node.named_children if c.type not in _COMMENTS]
            if len(inner) == 1 and inner[0].type in _LEAVES[family] | _CONTAINERS[family] | {"lexical_declaration",
                                                                                        "variable_declaration"}:
                return _declaration(inner[0], family)
            if len(inner) == 1 and kind == "expression_statement" and inner[0].type == "assignment_expression":
                right = inner[0].child_by_field_name("right")
                if right is not None and right.type in _FUNCTION_VALUES:
                    return _Decl((_text(inner[0].child_by_field_name("left")),), None)
            return None
        if kind in {"lexical_declaration", "variable_declaration"}:
            declarators = [c for c in node.named_children if c.type == "variable_declarator"]
            if len(declarators) == 1:
                value = declarators[0].child_by_field_name("value")
                if value is not None and value.type in _FUNCTION_VALUES:
                    return _Decl((_name(declarators[0]),), None)
            return None
        if kind in {"field_definition", "public_field_definition"}:
            value = node.child_by_field_name("value")
            key = node.child_by_field_name("property") or node.child_by_field_name("name")
            if value is not None and key is not None and value.type in _FUNCTION_VALUES:
                return _Decl((_text(key),), None)
            return None
    elif family == "go":
        if kind == "method_declaration":
            receiver = node.child_by_field_name("receiver")
            params = [c for c in receiver.named_children if c.type == "parameter_declaration"] if receiver else []
            if params:
                return _Decl((_type_name(params[0]), _name(node)), None)
        if kind == "type_declaration":
            specs = [c for c in node.named_children if c.type in {"type_spec", "type_alias"}]
            if len(specs) != 1:
                return None  # a grouped `type ( ... )` stays module-level code
            spec_type = specs[0].child_by_field_name("type")
            body = spec_type if spec_type is not None and spec_type.type == "interface_type" else None
            return _Decl((_name(specs[0]),), body)
    elif family == "rust":
        if kind == "impl_item":
            own = _type_name(node.child_by_field_name("type"))
            trait = node.child_by_field_name("trait")
            name = f"{_type_name(trait)} for {own}" if trait is not None else own
            return _Decl((name,), node.child_by_field_name("body"))
        if kind == "mod_item" and node.child_by_field_name("body") is None:
            return _Decl((_name(node),), None)  # `mod name;` declares a file
    if kind in _LEAVES[family]:
        return _Decl((_name(node),), None)
    if kind in _CONTAINERS[family]:
        return _Decl((_name(node),), node.child_by_field_name("body"))
    return None


# -- layout -------------------------------------------------------------------------------------------


class CodeSection(NamedTuple):
    """One section of a code file (character offsets; ``pipeline.chunking.Section``'s fields)."""

    heading_path: tuple[str, ...]
    start: int
    end: int
    body_start: int


@dataclass(frozen=True)
class CodeLayout:
    """A code file cut into sections and, when a token counter was given, each section's blocks."""

    sections: list[CodeSection]
    blocks: list[list[tuple[int, int]]]  # per section: character spans in order, trimmed of whitespace
    counter: TokenCounter | None  # the counter given, remembering the count of every block


class _Unit(NamedTuple):
    """Nodes kept together unless too long (a declaration with its comments, a header, a statement)."""

    start: int  # bytes
    end: int
    kids: tuple[Any, ...]  # nodes covering [start, end), for cutting it at statement boundaries


@dataclass
class _Sec:
    path: tuple[str, ...]
    units: list[_Unit]
    body_start: int | None = None  # bytes; a container header's: just after its opening brace
    takes_code: bool = True  # a header or code section: code that follows at its level joins it


class _MemoCounter:
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


class _Layout:
    """Walks one parse tree: sections from its declarations, then blocks within the token limit."""

    def __init__(self, text: str, data: bytes, family: str) -> None:
        self.text = text
        self.data = data
        self.family = family
        self.prelude = _PRELUDE[family]
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
            if lead and lead[-1].type in _COMMENTS and self._newlines(lead[-1].end_byte, kid.start_byte) >= 2:
                # a blank line detaches a comment from what follows
                groups.append(lead)
                lead = []
            if kid.type in self.prelude:
                trailing = (kid.type in _COMMENTS and groups and not lead
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

    # -- sections -------------------------------------------------------------------------------

    def members(self, body: Any) -> tuple[Any, Any, list[Any]] | None:
        """A container body's opening brace, closing brace and the nodes between them."""
        kids = body.children
        opening = next((i for i, k in enumerate(kids) if k.type == "{" and not k.is_named), None)
        closing = next((i for i in range(len(kids) - 1, -1, -1) if kids[i].type == "}" and not kids[i].is_named), None)
        if opening is None or closing is None or closing <= opening:
            return None
        return kids[opening], kids[closing], _flatten(kids[opening + 1 : closing])

    def walk(self, kids: Sequence[Any], path: tuple[str, ...], secs: list[_Sec], depth: int = 0) -> None:
        for group in self.groups(kids):
            main = next((n for n in group if n.type not in self.prelude), None)
            decl = _declaration(main, self.family) if main is not None and main.is_named else None
            unit = _Unit(group[0].start_byte, group[-1].end_byte, tuple(group))
            braces = self.members(decl.body) if decl is not None and decl.body is not None else None
            if decl is None:
                stray = main is not None and not main.is_named  # a `;` after a declaration stays with it
                if secs and (stray or (secs[-1].takes_code and secs[-1].path == path)):
                    secs[-1].units.append(unit)  # code at this level joins the code or header before it
                else:
                    secs.append(_Sec(path, [unit]))
            elif braces is None or depth >= _MAX_DEPTH:
                secs.append(_Sec(path + decl.names, [unit], takes_code=False))
            else:
                opening, closing, inner = braces
                lead = tuple(n for n in group if n.end_byte <= main.start_byte)
                trail = tuple(n for n in group if n.start_byte >= main.end_byte)
                header = _Unit(unit.start, opening.end_byte, lead + tuple(_cover(main, unit.start, opening.end_byte)))
                secs.append(_Sec(path + decl.names, [header], body_start=opening.end_byte))
                self.walk(inner, path + decl.names, secs, depth + 1)
                tail_kids = tuple(_cover(main, closing.start_byte, main.end_byte)) + trail
                secs[-1].units.append(_Unit(closing.start_byte, unit.end, tail_kids))

    def sections(self, secs: list[_Sec]) -> list[CodeSection]:
        starts = [self._line_start(s.units[0].start) for s in secs]
        if starts:
            starts[0] = 0
        ends = starts[1:] + [len(self.data)]
        out = []
        for sec, start, end in zip(secs, starts, ends):
            body = sec.body_start if sec.body_start is not None else start
            out.append(CodeSection(sec.path, self.char(start), self.char(end), self.char(body)))
        return out

    def _line_start(self, byte: int) -> int:
        line = self.data.rfind(b"\n", 0, byte) + 1
        return line if not self.data[line:byte].strip() else byte

    # -- blocks ---------------------------------------------------------------------------------

    def blocks(self, sec: _Sec, counter: TokenCounter, max_tokens: int) -> list[tuple[int, int]]:
        counts = self.sizes([(u.start, u.end) for u in sec.units], counter, max_tokens)
        spans: list[tuple[int, int]] = []
        for unit, tokens in zip(sec.units, counts):
            if tokens <= max_tokens or not unit.kids:
                spans.append((unit.start, unit.end))
                continue
            cut, tail, _ = self.cut(unit.kids, unit.start, 0, counter, max_tokens, 0)
            spans.extend(cut)
            spans.append((tail, unit.end))
        return [s for s in (self._trimmed(a, b) for a, b in spans) if s is not None]

    def sizes(self, spans: Sequence[tuple[int, int]], counter: TokenCounter, max_tokens: int) -> list[int]:
        """Token counts of byte spans, exact up to the limit; ``max_tokens + 1`` stands for "more".

        A long span is counted by its leading words (cut at whitespace, so they are tokenized as in
        the whole), four times more of them each round, until they exceed the limit or are all of
        it: the rest of a long span is never tokenized. Without this a deeply nested statement (a
        bundled module, a test suite in one call) would be tokenized again at every level it is
        opened at.
        """
        texts = [self.chars(start, end) for start, end in spans]
        counts = [0] * len(texts)
        todo = list(range(len(texts)))
        cap = 4 * max_tokens + 16  # characters: about the limit's worth of code; grown when it is not
        while todo:
            heads = [_leading_words(texts[i], cap) for i in todo]
            for i, head, n in zip(todo, heads, counter.count(heads)):
                counts[i] = n
            todo = [i for i, head in zip(todo, heads) if counts[i] <= max_tokens and len(head) < len(texts[i])]
            cap *= 4
        return [min(n, max_tokens + 1) for n in counts]

    def cut(
        self, kids: Sequence[Any], pending: int, pending_tokens: int, counter: TokenCounter, max_tokens: int, depth: int
    ) -> tuple[list[tuple[int, int]], int, int]:
        """Cut nodes too long for one block at statement boundaries.

        ``pending`` is where the text not yet emitted starts (``pending_tokens`` its tokens, counted
        by its parts); it grows over the nodes that fit after it. A node that does not fit after it is
        opened when it spans lines (a compound statement, a multi-line call), has braces, follows
        only comments, or is too long alone; between a node's own braces every statement is a block
        of its own. Returns the blocks emitted and the text still pending (start, tokens), which the
        caller continues.
        """
        spans: list[tuple[int, int]] = []
        counts = self.sizes([(k.start_byte, k.end_byte) for k in kids], counter, max_tokens)
        opening = next((i for i, k in enumerate(kids) if k.type == "{" and not k.is_named), None)
        closing = next((i for i in range(len(kids) - 1, -1, -1) if kids[i].type == "}" and not kids[i].is_named), None)
        if opening is not None and (closing is None or closing <= opening + 1):
            opening = None  # no statements between braces of its own
        commented = False  # the pending text is only comments and attributes
        i = 0
        while i < len(kids):
            kid, tokens = kids[i], counts[i]
            if i == opening:
                spans.append((pending, kid.end_byte))  # the header through its opening brace
                groups = self.groups(_flatten(kids[i + 1 : closing]))
                sizes = self.sizes([(g[0].start_byte, g[-1].end_byte) for g in groups], counter, max_tokens)
                for group, size in zip(groups, sizes):
                    start, end = group[0].start_byte, group[-1].end_byte
                    if size <= max_tokens or depth >= _MAX_DEPTH:
                        spans.append((start, end))
                    else:
                        inner, tail, _ = self.cut(group, start, 0, counter, max_tokens, depth + 1)
                        spans.extend(inner)
                        spans.append((tail, end))
                pending, pending_tokens = kids[closing].start_byte, 0
                i = closing
                continue
            if pending_tokens + tokens <= max_tokens:
                commented = kid.type in self.prelude and (commented or not pending_tokens)
                pending_tokens += tokens
            elif kid.child_count and depth < _MAX_DEPTH and (tokens > max_tokens or commented or self._compound(kid)):
                # a doc comment stays with the start of what it documents
                inner, pending, pending_tokens = self.cut(kid.children, pending, pending_tokens, counter, max_tokens,
                                                          depth + 1)
                spans.extend(inner)
                commented = False
            else:
                if pending_tokens:
                    spans.append((pending, kid.start_byte))
                pending, pending_tokens = kid.start_byte, tokens
                commented = kid.type in self.prelude
            i += 1
        return spans, pending, pending_tokens

    def _compound(self, node: Any) -> bool:
        """Whether a node is worth opening rather than moved whole: it spans lines or has braces."""
        return self.data.find(b"\n", node.start_byte, node.end_byte) != -1 or any(
            k.type == "{" and not k.is_named for k in node.children)

    def _trimmed(self, start: int, end: int) -> tuple[int, int] | None:
        s, e = self.char(start), self.char(end)
        while s < e and self.text[s].isspace():
            s += 1
        while e > s and self.text[e - 1].isspace():
            e -= 1
        return (s, e) if s < e else None


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


def _leading_words(text: str, length: int) -> str:
    """At most ``length`` characters of ``text``, cut at whitespace (all of it when it is no longer)."""
    if len(text) <= length:
        return text
    cut = max(text.rfind(" ", 0, length), text.rfind("\n", 0, length), text.rfind("\t", 0, length))
    return text[:cut] if cut > 0 else text


def _flatten(kids: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for kid in kids:
        out.extend(_flatten(kid.children) if kid.type in _TRANSPARENT else [kid])
    return out


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
    tree = _parse(data + b"\n", fmt)
    root = tree.root_node
    if root.has_error:
        line = _first_error(root).start_point[0] + 1
        logger.warning("%s: %s syntax error at line %d; chunked as plain text", doc_id or "document", grammar.language,
                       line)
        return None
    layout = _Layout(text, data, grammar.family)
    secs: list[_Sec] = []
    layout.walk(root.children, (), secs)
    sections = layout.sections(secs)
    if counter is None:
        return CodeLayout(sections, [[] for _ in sections], None)
    memo = _MemoCounter(counter)
    blocks = [layout.blocks(sec, memo, max_tokens) for sec in secs]
    flat = [span for spans in blocks for span in spans]
    in_order = bool(flat) and all(a[1] <= b[0] for a, b in zip(flat, flat[1:]))
    if not in_order or "".join(text.split()) != "".join("".join(text[s:e] for s, e in flat).split()):
        logger.warning("%s: the %s parse tree does not cover the text; chunked as plain text", doc_id or "document",
                       grammar.language)
        return None
    memo.count([text[s:e] for s, e in flat])
    return CodeLayout(sections, blocks, memo)

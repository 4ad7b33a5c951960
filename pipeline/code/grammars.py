"""Chunking stage, source code: the tree-sitter grammar of each code format, how a file is parsed and
the versions that name a code document's chunker."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.extras import require

CODE_ALGORITHM = "code-v1"


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
    """What decides a code document's chunks beyond the chunker configuration: the code chunker's
    algorithm and the versions of tree-sitter and of the format's grammar ("" for formats that are
    not code). Part of ``pipeline.diff.document_chunker``, so upgrading one grammar re-chunks that
    language's files and no others. Nothing in it names a module: moving the code does not re-chunk."""
    grammar = GRAMMARS.get(fmt)
    if grammar is None:
        return ""
    return (f";{CODE_ALGORITHM};tree-sitter={_version('tree-sitter')}"
            f";{grammar.distribution}={_version(grammar.distribution)}")


@functools.cache
def _language(fmt: str) -> Any:
    tree_sitter = require("tree_sitter", "pipeline", "chunking source code")
    return tree_sitter.Language(GRAMMARS[fmt].load())


def parse(data: bytes, fmt: str) -> Any:
    """The parse tree of UTF-8 ``data`` in format ``fmt`` (one of ``CODE_FORMATS``).

    Raises:
        MissingExtra: tree-sitter or the format's grammar is not installed.
    """
    tree_sitter = require("tree_sitter", "pipeline", "chunking source code")
    return tree_sitter.Parser(_language(fmt)).parse(data)  # a parser per call: parsers are not thread-safe

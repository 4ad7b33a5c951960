"""Source code chunked by declaration through tree-sitter: JavaScript/TypeScript, Go, Rust and Java."""

import json
import logging
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, write_tree
from pipeline.chunking import chunk_document, split_sections
from pipeline.code import CODE_FORMATS, code_chunker_version, code_layout
from pipeline.diff import document_chunker, plan_changes
from pipeline.sources import DEFAULT_INCLUDE, make_document, scan_source
from registry.store import DocumentState
from test_chunking import WORDS, check_chunks

TS = '''import { Injectable } from "@angular/core";
import type { Repo, User } from "./model";

// How long a cached user stays valid.
export const TTL_MS = 60_000;

/** Looks users up, from the cache first. */
export interface Finder<T extends User> {
  find(id: string): Promise<T | undefined>;
  readonly size: number;
}

/**
 * The user service: a read-through cache in front of the repository.
 */
@Injectable({ providedIn: "root" })
export class UserService<T extends User> implements Finder<T> {
  private readonly cache = new Map<string, { user: T; at: number }>();

  constructor(private readonly repo: Repo<T>, private readonly clock: () => number = Date.now) {}

  get size(): number {
    return this.cache.size;
  }

  /** The user with this id, or undefined when the repository has none. */
  @Traced("users.find")
  async find(id: string): Promise<T | undefined> {
    const hit = this.cache.get(id);
    if (hit && this.clock() - hit.at < TTL_MS) {
      return hit.user;
    }
    const user = await this.repo.get(id);
    if (user !== undefined) {
      this.cache.set(id, { user, at: this.clock() });
    }
    return user;
  }

  evict = (id: string): boolean => this.cache.delete(id);
}

export const normalizeId = (raw: string): string => {
  function strip(value: string): string {
    return value.replace(/[^a-z0-9-]/gi, "");
  }
  return strip(raw.trim()).toLowerCase();
};
'''

JS = '''#!/usr/bin/env node
"use strict";

const path = require("node:path");

/**
 * Render one row of the report.
 */
function renderRow({ name, total }, width = 40) {
  const label = name.padEnd(width, ".");
  return `${label} ${total.toFixed(2)}`;
}

class Report {
  #rows = [];

  add(name, total) {
    this.#rows.push({ name, total });
    return this;
  }

  // Every row, widest name first.
  *lines() {
    const width = Math.max(...this.#rows.map((r) => r.name.length));
    for (const row of this.#rows) {
      yield renderRow(row, width);
    }
  }
}

export function App({ report }) {
  return <ul>{[...report.lines()].map((line) => <li key={line}>{line}</li>)}</ul>;
}

module.exports = { Report, renderRow, root: path.resolve(".") };
'''

GO = '''// Package store keeps sessions in memory.
package store

import (
	"errors"
	"sync"
	"time"
)

// ErrExpired is returned for a session past its deadline.
var ErrExpired = errors.New("store: session expired")

// Store is what the handlers need from session storage.
type Store[K comparable, V any] interface {
	// Get returns the value stored under k.
	Get(k K) (V, error)
	Put(k K, v V, ttl time.Duration)
}

// Memory is a Store backed by a map.
type Memory[K comparable, V any] struct {
	mu      sync.Mutex
	entries map[K]entry[V]
}

type entry[V any] struct {
	value    V
	deadline time.Time
}

// Get returns the value stored under k, or ErrExpired.
func (m *Memory[K, V]) Get(k K) (V, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.entries[k]
	if !ok || time.Now().After(e.deadline) {
		var zero V
		return zero, ErrExpired
	}
	return e.value, nil
}

func (m *Memory[K, V]) Put(k K, v V, ttl time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.entries == nil {
		m.entries = make(map[K]entry[V])
	}
	m.entries[k] = entry[V]{value: v, deadline: time.Now().Add(ttl)}
}

// New makes an empty store.
func New[K comparable, V any]() *Memory[K, V] {
	return &Memory[K, V]{entries: map[K]entry[V]{}}
}
'''

RUST = '''//! A small header parser.

use std::fmt;

/// One parsed header line.
#[derive(Debug, Clone, PartialEq)]
pub struct Header<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

/// Reads headers out of a byte buffer.
pub struct Parser<'a> {
    buf: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    /// A parser at the start of `buf`.
    pub fn new(buf: &'a str) -> Self {
        Parser { buf, pos: 0 }
    }

    /// The next header, or `None` at the blank line that ends them.
    pub fn parse_header(&mut self) -> Option<Result<Header<'a>, Error>> {
        let rest = &self.buf[self.pos..];
        let line = rest.split("\\r\\n").next()?;
        if line.is_empty() {
            return None;
        }
        self.pos += line.len() + 2;
        Some(match line.split_once(':') {
            Some((name, value)) => Ok(Header { name: name.trim(), value: value.trim() }),
            None => Err(Error::Malformed(self.pos)),
        })
    }
}

#[derive(Debug)]
pub enum Error {
    Malformed(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Malformed(at) => write!(f, "malformed header before byte {at}"),
        }
    }
}

macro_rules! header {
    ($name:expr, $value:expr) => {
        Header { name: $name, value: $value }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_headers() {
        let mut p = Parser::new("Host: a\\r\\nAccept: b\\r\\n\\r\\n");
        assert_eq!(p.parse_header(), Some(Ok(header!("Host", "a"))));
    }
}
'''

JAVA = '''package com.example.users;

import java.util.Map;
import java.util.Optional;
import java.util.concurrent.ConcurrentHashMap;

/**
 * Finds users, from the cache first.
 */
@Service
public class UserService<T extends User> implements Finder<T> {
    private static final long TTL_MILLIS = 60_000L;

    private final Repository<T> repo;
    private final Map<String, Cached<T>> cache = new ConcurrentHashMap<>();

    public UserService(Repository<T> repo) {
        this.repo = repo;
    }

    /** The user with this id, if the repository has one. */
    @Override
    @Transactional(readOnly = true)
    public Optional<T> find(String id) {
        Cached<T> hit = cache.get(id);
        if (hit != null && System.currentTimeMillis() - hit.at() < TTL_MILLIS) {
            return Optional.of(hit.user());
        }
        Optional<T> user = repo.findById(id);
        user.ifPresent(u -> cache.put(id, new Cached<>(u, System.currentTimeMillis())));
        return user;
    }

    private record Cached<U>(U user, long at) {}

    /** How a lookup went, for the metrics. */
    public enum Outcome {
        HIT, MISS;

        String label() {
            return name().toLowerCase();
        }
    }
}
'''

SOURCES = {"service.ts": TS, "report.jsx": JS, "store.go": GO, "parser.rs": RUST, "UserService.java": JAVA}


def doc(name, text):
    d = make_document(name, text, f"file:///{name}")
    assert not hasattr(d, "reason"), d
    return d


def sections_of(name, text):
    d = doc(name, text)
    return [(s.heading_path, d.text[s.start : s.end]) for s in split_sections(d.text, d.format)]


def paths(name, text):
    return [p for p, _ in sections_of(name, text)]


# -- sections: declarations and their enclosing names -------------------------------------------------


def test_typescript_sections():
    assert doc("service.ts", TS).format == "typescript"
    assert paths("service.ts", TS) == [
        (),
        ("Finder",), ("Finder", "find"), ("Finder",),
        ("UserService",), ("UserService", "constructor"), ("UserService", "size"), ("UserService", "find"),
        ("UserService", "evict"),  # a field holding an arrow function is a method
        ("normalizeId",),
    ]
    by_path = dict(sections_of("service.ts", TS))
    # the doc comment and the decorator belong to the method, the class's to the class
    assert by_path[("UserService", "find")].lstrip().startswith('/** The user with this id')
    assert '@Traced("users.find")\n  async find(' in by_path[("UserService", "find")]
    assert by_path[("UserService",)].startswith("/**\n * The user service")
    assert "private readonly cache" in by_path[("UserService",)]  # fields stay with the class
    # the nested function stays inside the function that holds it
    assert "function strip(" in by_path[("normalizeId",)]
    # module-level code keeps its place: the constant with its comment before the interface
    assert by_path[()].endswith("export const TTL_MS = 60_000;\n\n")


def test_javascript_sections():
    assert doc("report.jsx", JS).format == "javascript"
    sections = sections_of("report.jsx", JS)
    assert [p for p, _ in sections] == [
        (), ("renderRow",), ("Report",), ("Report", "add"), ("Report", "lines"), ("App",), (),
    ]
    by_path = dict(sections)
    assert by_path[("Report", "lines")].lstrip().startswith("// Every row, widest name first.\n  *lines()")
    assert by_path[("Report",)].startswith("class Report {\n  #rows = [];")
    assert sections[-1][1].startswith("module.exports = {")


TSX = """import React from "react";

type Props = { items: string[] };

/** The list. */
export function List({ items }: Props): JSX.Element {
  return <ul>{items.map((i) => <li key={i}>{i}</li>)}</ul>;
}

export default class Panel extends React.Component<Props> {
  render() {
    return <div><List items={this.props.items} /></div>;
  }
}
"""


def test_tsx_sections():
    assert doc("panel.tsx", TSX).format == "tsx"
    assert paths("panel.tsx", TSX) == [(), ("Props",), ("List",), ("Panel",), ("Panel", "render")]
    assert dict(sections_of("panel.tsx", TSX))[("List",)].startswith("/** The list. */\nexport function List(")


def test_go_sections():
    assert paths("store.go", GO) == [
        (),
        ("Store",), ("Store", "Get"), ("Store", "Put"),
        ("Memory",), ("entry",),
        ("Memory", "Get"), ("Memory", "Put"),  # a method's enclosing name is its receiver's type
        ("New",),
    ]
    by_path = dict(sections_of("store.go", GO))
    assert by_path[("Memory", "Get")].startswith("// Get returns the value stored under k, or ErrExpired.\nfunc (m")
    assert by_path[("Store", "Get")].lstrip().startswith("// Get returns the value stored under k.\n\tGet(k K)")
    assert "var ErrExpired" in by_path[()]


def test_rust_sections():
    assert paths("parser.rs", RUST) == [
        (),
        ("Header",), ("Parser",),
        ("Parser",), ("Parser", "new"), ("Parser", "parse_header"),
        ("Error",),
        ("Display for Error",), ("Display for Error", "fmt"),
        ("header",),
        ("tests",), ("tests", "parses_two_headers"),
    ]
    sections = sections_of("parser.rs", RUST)
    by_path = dict(sections)
    # doc comments and attributes belong to the item they precede
    assert by_path[("Header",)].startswith(
        "/// One parsed header line.\n#[derive(Debug, Clone, PartialEq)]\npub struct")
    assert by_path[("Error",)].startswith("#[derive(Debug)]\npub enum Error")
    assert by_path[("Parser", "parse_header")].lstrip().startswith("/// The next header")
    assert by_path[("tests", "parses_two_headers")].lstrip().startswith("#[test]\n    fn parses_two_headers")
    assert sections[3][1].startswith("impl<'a> Parser<'a> {")  # the impl block's own header


def test_java_sections():
    assert paths("UserService.java", JAVA) == [
        (),
        ("UserService",), ("UserService", "UserService"), ("UserService", "find"),
        ("UserService", "Cached"), ("UserService", "Outcome"), ("UserService", "Outcome", "label"),
    ]
    by_path = dict(sections_of("UserService.java", JAVA))
    assert by_path[("UserService",)].startswith(
        "/**\n * Finds users, from the cache first.\n */\n@Service\npublic class")
    assert "private final Repository<T> repo;" in by_path[("UserService",)]  # fields stay with the class
    find = by_path[("UserService", "find")]
    assert find.lstrip().startswith("/** The user with this id")
    assert "@Override\n    @Transactional(readOnly = true)\n    public Optional<T> find(String id) {" in find
    assert by_path[("UserService", "Outcome", "label")].rstrip().endswith("}\n    }\n}")  # closing braces stay


ATTACHMENT = {
    "a.rs": ("fn a() {} // trailing note on a\n/// doc for b\nfn b() {}\n\n// a detached comment\n\nfn c() {}\n",
             "/// doc for b"),
    "a.go": ("package a\n\nfunc a() {} // trailing note on a\n// doc for b\nfunc b() {}\n\n// a detached comment\n\n"
             "func c() {}\n", "// doc for b"),
    "A.java": ("class A {\n  void a() {} // trailing note on a\n  /** doc for b */\n  void b() {}\n\n"
               "  // a detached comment\n\n  void c() {}\n}\n", "/** doc for b */"),
    "a.ts": ("function a() {} // trailing note on a\n// doc for b\nfunction b() {}\n\n// a detached comment\n\n"
             "function c() {}\n", "// doc for b"),
}


@pytest.mark.parametrize("name", sorted(ATTACHMENT))
def test_comments_attach_to_what_they_precede_unless_a_blank_line_parts_them(name):
    text, doc_b = ATTACHMENT[name]
    # the method names; code at the level of the declarations (the class's own, in Java) has none
    found = [(p[-1:] if p not in {(), ("A",)} else (), t.strip()) for p, t in sections_of(name, text)]
    by_name = dict(found)
    assert by_name[("a",)].endswith("// trailing note on a")  # a comment ending a line belongs to that line
    assert by_name[("b",)].startswith(doc_b)
    assert by_name[("c",)].startswith("void c()" if name.endswith(".java") else "f")
    detached = [t for p, t in found if "a detached comment" in t]
    assert detached == ["// a detached comment"]  # code of its own, kept in order
    assert [p for p, _ in found if p] == [("a",), ("b",), ("c",)]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_sections_cover_the_file_in_order(name):
    d = doc(name, SOURCES[name])
    sections = split_sections(d.text, d.format)
    assert sections[0].start == 0 and sections[-1].end == len(d.text)
    assert all(a.end == b.start for a, b in zip(sections, sections[1:]))
    assert "".join(d.text[s.start : s.end] for s in sections) == d.text


# -- chunks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_chunks_are_exact_sized_and_deterministic_with_the_real_tokenizer(name, embedder):
    counter = embedder.token_counter()
    d = doc(name, SOURCES[name])
    for max_tokens in (embedder.max_tokens, 64, 24):
        chunks = chunk_document(d, counter, max_tokens)
        check_chunks(d, chunks, counter, max_tokens)
        assert chunks == chunk_document(doc(name, SOURCES[name]), counter, max_tokens)
        assert {c.heading_path for c in chunks} <= set(paths(name, SOURCES[name]))


def chunk_at(chunks, needle):
    (found,) = [c for c in chunks if needle in c.text]
    return found


def test_chunks_carry_the_enclosing_names(embedder):
    counter = embedder.token_counter()
    java = chunk_document(doc("UserService.java", JAVA), counter, 96)
    assert chunk_at(java, "public Optional<T> find(String id) {").heading_path == ("UserService", "find")
    rust = chunk_document(doc("parser.rs", RUST), counter, 96)
    assert chunk_at(rust, "pub fn parse_header(&mut self)").heading_path == ("Parser", "parse_header")
    ts = chunk_document(doc("service.ts", TS), counter, 96)
    assert chunk_at(ts, "async find(id: string)").heading_path == ("UserService", "find")
    go = chunk_document(doc("store.go", GO), counter, 96)
    assert chunk_at(go, "func (m *Memory[K, V]) Put(").heading_path == ("Memory", "Put")


def big_go_function(statements: int) -> str:
    body = "\n".join(f"\ttotal += weigh(items[{i}], {i}) // item {i} of the batch" for i in range(statements))
    return f"""package batch

// Weigh adds up the batch.
func (b *Batch) Weigh(items []Item) int {{
\ttotal := 0
{body}
\tif total > b.limit {{
\t\tb.overflow = true
\t\treturn b.limit
\t}}
\treturn total
}}
"""


def test_an_oversized_function_is_cut_at_statement_boundaries(embedder):
    counter, max_tokens = embedder.token_counter(), embedder.max_tokens
    d = doc("batch.go", big_go_function(120))
    chunks = chunk_document(d, counter, max_tokens)
    check_chunks(d, chunks, counter, max_tokens)
    weigh = [c for c in chunks if c.heading_path == ("Batch", "Weigh")]
    assert len(weigh) >= 4 and weigh == chunks[1:] or weigh == chunks
    for c in weigh:
        # every cut falls between statements: a chunk starts at a line's first token and ends at a line's end
        assert d.text[: c.char_start].rsplit("\n", 1)[-1].strip() == ""
        assert d.text[c.char_end :].split("\n", 1)[0] == ""
    assert weigh[0].text.startswith("// Weigh adds up the batch.\nfunc (b *Batch) Weigh(items []Item) int {")
    assert weigh[-1].text.endswith("\treturn total\n}")


def test_an_oversized_statement_is_opened_at_its_inner_statements(embedder):
    counter = embedder.token_counter()
    cases = "\n".join(f"        case {i}: return handle{i}(request, \"route {i}\");" for i in range(80))
    text = f"""class Router {{
    Response route(int code, Request request) {{
        switch (code) {{
{cases}
        default: return Response.notFound();
        }}
    }}
}}
"""
    d = doc("Router.java", text)
    chunks = chunk_document(d, counter, 128)
    check_chunks(d, chunks, counter, 128)
    assert len(chunks) > 4 and {c.heading_path for c in chunks} == {("Router", "route")}
    for c in chunks[1:]:
        assert c.text.startswith("case ") or c.text.startswith("default:"), c.text[:30]


class Tally:
    """The real counter, adding up how many characters it was asked to tokenize."""

    def __init__(self, counter):
        self.name, self.counter, self.chars = counter.name, counter, 0

    def count(self, texts):
        self.chars += sum(map(len, texts))
        return self.counter.count(texts)


def test_a_deeply_nested_statement_is_not_tokenized_again_at_every_level(embedder):
    def suite(depth):
        if depth == 0:
            return "\n".join(f'it("case {i}", () => {{ expect(parse("input {i}")).toEqual({{ value: {i} }}); }});'
                             for i in range(150))
        return f'describe("level {depth}", () => {{\n{suite(depth - 1)}\n}});'

    d = doc("parse.test.js", 'import { parse } from "./parse.js";\n\n' + suite(8) + "\n")
    tally = Tally(embedder.token_counter())
    chunks = chunk_document(d, tally, embedder.max_tokens)
    check_chunks(d, chunks, embedder.token_counter(), embedder.max_tokens)
    assert all(c.text.startswith(("it(", "describe(", "import ")) for c in chunks)  # cut between statements
    assert tally.chars < 5 * len(d.text)  # opened 9 levels deep, yet read about once for the cut, once for the chunks


def test_a_token_longer_than_the_limit_is_left_to_the_text_cutter(embedder):
    counter = embedder.token_counter()
    words = " ".join(f"word{i}" for i in range(400))
    d = doc("blob.rs", f'pub const BLOB: &str = "{words}";\n\nfn after() {{}}\n')
    chunks = chunk_document(d, counter, 64)
    check_chunks(d, chunks, counter, 64)
    assert all(c.heading_path == ("BLOB",) for c in chunks[:-1])
    # the declaration after a long one that was cut by content leads its own chunk
    assert chunks[-1].heading_path == ("after",) and chunks[-1].text == "fn after() {}"


def test_non_ascii_text_keeps_character_offsets(embedder):
    text = ('// Grüße, 世界 🌍\npackage i18n\n\n// Greet says hello in the visitor’s language.\n'
            'func Greet(lang string) string {\n\tswitch lang {\n\tcase "de":\n\t\treturn "Grüß dich"\n'
            '\tcase "ja":\n\t\treturn "こんにちは"\n\t}\n\treturn "hello 👋"\n}\n')
    d = doc("i18n.go", text)
    by_path = {s.heading_path: d.text[s.start : s.end] for s in split_sections(d.text, d.format)}
    assert by_path[("Greet",)].startswith("// Greet says hello in the visitor’s language.\nfunc Greet(")
    assert by_path[()] == "// Grüße, 世界 🌍\npackage i18n\n\n"
    counter = embedder.token_counter()
    chunks = chunk_document(d, counter, 16)
    check_chunks(d, chunks, counter, 16)
    assert any(c.text.startswith("// Greet says hello") for c in chunks)


BROKEN = {
    "broken.ts": "export class Broken {\n  method( {\n    return 1;\n  }\n}\n",
    "broken.js": "function ok() { return 1; }\n\nfunction broken( {\n",
    "broken.go": "package b\n\nfunc ok() int { return 1 }\n\nfunc broken() int {\n\treturn 1 +\n}\n",
    "broken.rs": "fn ok() -> u8 { 1 }\n\nfn broken() -> u8 { let x = ; x }\n",
    "Broken.java": "class Broken {\n  void ok() {}\n  void broken() { int x = ; }\n}\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_file_that_does_not_parse_is_chunked_as_plain_text(name, caplog, embedder):
    counter = embedder.token_counter()
    d = doc(name, BROKEN[name] + "\n\n".join(f"Trailing paragraph {i} of the file." for i in range(3)))
    as_text = doc(name + ".txt", d.text)
    with caplog.at_level(logging.WARNING, logger="pipeline.code.layout"):
        chunks = chunk_document(d, counter, 16)
    plain = chunk_document(as_text, counter, 16)
    assert [(c.char_start, c.char_end, c.heading_path) for c in chunks] == [
        (c.char_start, c.char_end, c.heading_path) for c in plain]
    assert all(c.heading_path == () for c in chunks)
    check_chunks(d, chunks, counter, 16)
    (record,) = [r for r in caplog.records if r.name == "pipeline.code.layout"]
    assert record.getMessage().startswith(f"{name}: ") and "syntax error at line" in record.getMessage()
    assert record.getMessage().endswith("; chunked as plain text")
    assert split_sections(d.text, d.format) == split_sections(d.text, "text")


def test_the_error_line_is_the_first_broken_line(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.code.layout"):
        assert code_layout(BROKEN["broken.go"], "go", doc_id="broken.go") is None
    assert "Go syntax error at line 6;" in caplog.records[-1].getMessage()


def test_a_missing_grammar_names_the_extra_to_install():
    code = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tree_sitter_go":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocked())
from pipeline.chunking import chunk_document
from pipeline.sources import make_document
from registry.errors import MissingExtra
class Words:
    name = "words"
    def count(self, texts):
        return [len(t.split()) for t in texts]
try:
    chunk_document(make_document("a.go", "package a\\n", "uri"), Words(), 64)
except MissingExtra as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("chunking Go needs the 'tree_sitter_go' package, which this installation lacks: "
                                  'pip install "ragpipe[pipeline]"')


# -- edits ---------------------------------------------------------------------------------------------


def go_file(bodies):
    return "package calc\n\nimport \"math\"\n\n" + "\n\n".join(
        f"// Step{i} is step {i} of the pipeline.\nfunc Step{i}(x float64) float64 {{\n{body}\n}}"
        for i, body in enumerate(bodies)) + "\n"


def statements(i, n):
    return "\n".join(f"\tx = math.Sqrt(x*{k + 1}.5 + {i}) // adjustment {k} for the step {i} input" for k in range(n))


def test_an_edit_inside_one_function_recuts_only_that_function(embedder):
    counter, max_tokens = embedder.token_counter(), embedder.max_tokens
    bodies = [statements(i, 6) + "\n\treturn x" for i in range(6)]
    before = doc("calc.go", go_file(bodies))
    edited = list(bodies)
    edited[3] = edited[3].replace("adjustment 2 for", "adjustment 2 (tuned) for")
    after = doc("calc.go", go_file(edited))
    old, new = chunk_document(before, counter, max_tokens), chunk_document(after, counter, max_tokens)
    check_chunks(after, new, counter, max_tokens)
    old_hashes, new_hashes = {c.chunk_hash: c for c in old}, {c.chunk_hash: c for c in new}
    gone = [old_hashes[h] for h in old_hashes.keys() - new_hashes.keys()]
    came = [new_hashes[h] for h in new_hashes.keys() - old_hashes.keys()]
    assert [c.heading_path for c in gone] == [("Step3",)] and [c.heading_path for c in came] == [("Step3",)]
    assert len(old) == len(new) >= 6


# -- properties ----------------------------------------------------------------------------------------

word = st.sampled_from(["total", "count", "value", "limit", "scale", "offset", "weight", "delta"])
statement = st.tuples(word, word, st.integers(0, 99)).map(lambda t: f"{t[0]} = {t[1]} + {t[2]};")
body = st.lists(statement, min_size=1, max_size=12)
functions = st.lists(body, min_size=1, max_size=6)


def render_js(bodies, with_class):
    parts = ["import { helper } from './helper.js';"]
    for i, stmts in enumerate(bodies):
        inner = "\n".join(f"  {s}" for s in stmts)
        parts.append(f"// Function {i}.\nfunction step{i}(total, count) {{\n{inner}\n  return total;\n}}")
    if with_class:
        methods = "\n\n".join(f"  run{i}(value) {{\n    {stmts[0]}\n    return value;\n  }}"
                              for i, stmts in enumerate(bodies))
        parts.append(f"class Runner {{\n{methods}\n}}")
    parts.append("export default step0;")
    return "\n\n".join(parts) + "\n"


@settings(max_examples=120, deadline=None)
@given(functions, st.booleans(), st.integers(8, 60))
def test_code_chunking_is_deterministic_and_exact(bodies, with_class, max_tokens):
    d = doc("gen.js", render_js(bodies, with_class))
    first = chunk_document(d, WORDS, max_tokens)
    assert first == chunk_document(d, WORDS, max_tokens)
    check_chunks(d, first, WORDS, max_tokens)
    names = {f"step{i}" for i in range(len(bodies))} | {"Runner"}
    assert all(not c.heading_path or c.heading_path[0] in names for c in first)


def function_spans(text):
    starts = [text.index(f"// Function {i}.") for i in range(text.count("// Function "))]
    return list(zip(starts, starts[1:] + [text.index("export default")]))


@settings(max_examples=120, deadline=None)
@given(functions, st.data(), st.integers(10, 40))
def test_an_edit_inside_one_function_keeps_other_boundaries(bodies, data, max_tokens):
    i = data.draw(st.integers(0, len(bodies) - 1), label="edited function")
    edited = list(bodies)
    edited[i] = data.draw(body, label="its new body")
    before, after = doc("gen.js", render_js(bodies, False)), doc("gen.js", render_js(edited, False))
    old, new = chunk_document(before, WORDS, max_tokens), chunk_document(after, WORDS, max_tokens)
    spans = function_spans(before.text)
    # everything before the function preceding the edited one is untouched, offsets included
    stable_end = spans[i - 1][0] if i >= 1 else 0
    assert [(c.char_start, c.char_end, c.text) for c in old if c.char_end <= stable_end] == [
        (c.char_start, c.char_end, c.text) for c in new if c.char_end <= stable_end]
    # inside every other function, chunks but the first (which may join the chunk before) reappear
    new_texts = {c.text for c in new}
    for j, (s, e) in enumerate(spans):
        inside = [c for c in old if s <= c.char_start and c.char_end <= e]
        if j != i:
            for c in inside[1:]:
                assert c.text in new_texts


# -- what decides a code file's chunks -----------------------------------------------------------------


def test_grammar_versions_are_part_of_a_code_documents_chunker():
    from importlib.metadata import version

    go, md = doc("a.go", GO), doc("a.md", "# A\n\nText.\n")
    assert f";tree-sitter-go={version('tree-sitter-go')}" in document_chunker("v", go)
    assert f";tree-sitter={version('tree-sitter')}" in document_chunker("v", go)
    assert document_chunker("v", md) == "v;format=markdown" and code_chunker_version("markdown") == ""
    assert {code_chunker_version(f) != "" for f in CODE_FORMATS} == {True}


def test_a_grammar_upgrade_rechunks_exactly_that_languages_files():
    from importlib.metadata import version

    docs = [doc("parser.rs", RUST), doc("lib.rs", "fn lib() {}\n"), doc("store.go", GO), doc("a.md", "# A\n")]
    current = f"tree-sitter-rust={version('tree-sitter-rust')}"

    def recorded(d):  # the registry's row, written when the older Rust grammar cut the file
        return DocumentState(d.doc_id, d.content_hash, d.metadata_hash,
                             document_chunker("v", d).replace(current, "tree-sitter-rust=0.20.0"), "active", 1)

    plan = plan_changes({d.doc_id: recorded(d) for d in docs}, docs, "v")
    assert [d.doc_id for d in plan.changed] == ["parser.rs", "lib.rs"]
    assert plan.unchanged == ("store.go", "a.md")


# -- sources -------------------------------------------------------------------------------------------


def test_code_files_are_read_by_default_with_their_format(tmp_path):
    files = {"web/app.js": "export const a = 1;\n", "web/m.mjs": "export {};\n", "web/c.cjs": "module.exports = 1;\n",
             "web/v.jsx": "const V = () => <p/>;\n", "web/s.ts": "let x: number = 1;\n",
             "web/t.tsx": "const T = (): JSX.Element => <b/>;\n", "go/main.go": "package main\n",
             "rs/lib.rs": "fn f() {}\n", "java/A.java": "class A {}\n",
             "web/node_modules/dep/index.js": "module.exports = 2;\n", "node_modules/x.js": "1;\n"}
    scan = scan_source(write_tree(tmp_path, files))
    assert {d.doc_id: d.format for d in scan.documents} == {
        "go/main.go": "go", "java/A.java": "java", "rs/lib.rs": "rust", "web/app.js": "javascript",
        "web/c.cjs": "javascript", "web/m.mjs": "javascript", "web/s.ts": "typescript", "web/t.tsx": "tsx",
        "web/v.jsx": "javascript"}
    assert {"*.js", "*.mjs", "*.cjs", "*.jsx", "*.ts", "*.tsx", "*.go", "*.rs", "*.java"} <= set(DEFAULT_INCLUDE)
    for d in scan.documents:
        assert code_layout(d.text, d.format) is not None, d.doc_id  # each parses with its own grammar


@pytest.mark.db
def test_an_edited_method_is_all_a_run_embeds_again(tmp_path, registry, embedder):
    from pipeline.config import IndexConfig
    from pipeline.runner import run_index

    src = write_tree(tmp_path / "src", {"calc.go": go_file([statements(i, 6) + "\n\treturn x" for i in range(6)]),
                                        "parser.rs": RUST, "UserService.java": JAVA})
    config = IndexConfig(index="code", lock_timeout=5)
    first = run_index(str(src), registry, embedder, config)
    assert first.documents["new"] == 3 and first.skipped == []
    text = (src / "calc.go").read_text()
    (src / "calc.go").write_text(text.replace("adjustment 2 for the step 3", "adjustment 2 (tuned) for the step 3"))
    second = run_index(str(src), registry, embedder, config)
    assert second.documents["changed"] == 1 and second.documents["unchanged"] == 2
    assert second.embedding["chunks_embedded"] == 1  # Step3's chunk; the other functions' come from the cache
    scan = scan_source(src)
    counter = embedder.token_counter()
    fresh = {c.chunk_id for d in scan.documents for c in chunk_document(d, counter, embedder.max_tokens)}
    assert registry.active_chunk_ids("code") == fresh


# -- end to end ----------------------------------------------------------------------------------------


def ragpipe(args, database_url, home):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.db
@pytest.mark.slow
def test_index_and_search_a_mixed_language_tree(tmp_path, database_url):
    src = write_tree(tmp_path / "src", {f"code/{name}": text for name, text in SOURCES.items()}
                     | {"README.md": "# Users\n\nThe user service caches lookups.\n"})
    home = tmp_path / "home"
    indexed = ragpipe(["index", str(src), "--json"], database_url, home)
    assert indexed.returncode == 0, indexed.stderr
    summary = json.loads(indexed.stdout)
    assert summary["documents"]["new"] == 6 and summary["skipped"] == []

    def hit_with(query, doc_id, needle):
        out = ragpipe(["search", query, "--k", "10", "--json"], database_url, home)
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)
        found = [h for h in hits if h["doc_id"] == doc_id and needle in h["text"]]
        assert len(found) == 1, (query, [(h["doc_id"], h["heading_path"]) for h in hits])
        source = (src / doc_id).read_text()
        assert source[found[0]["char_start"] : found[0]["char_end"]] == found[0]["text"]
        return found[0]

    hit = hit_with("parse the next header line at the colon", "code/parser.rs", "pub fn parse_header(")
    assert hit["heading_path"] == ["Parser", "parse_header"]
    hit = hit_with("find a user by id in the cache or the repository", "code/UserService.java",
                   "public Optional<T> find(String id)")
    assert hit["heading_path"] == ["UserService", "find"]
    hit = hit_with("get a session value unless its deadline passed", "code/store.go", "func (m *Memory[K, V]) Get(")
    assert hit["heading_path"] == ["Memory", "Get"]
    hit = hit_with("find a user from the cache while it is fresh", "code/service.ts", "async find(id: string)")
    assert hit["heading_path"] == ["UserService", "find"]

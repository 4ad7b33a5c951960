import os
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.chunking import chunk_document, chunker_version, context_line, document_sections, split_sections
from pipeline.embedding import SentenceTransformerEmbedder
from pipeline.sources import make_document


class WordCounter:
    """One token per whitespace-separated word: a pure stand-in for fast property tests."""

    name = "words"

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]


WORDS = WordCounter()


@pytest.fixture(scope="module")
def model_counter():
    emb = SentenceTransformerEmbedder()
    return emb.token_counter(), emb.max_tokens


def doc(text: str, doc_id: str = "doc.md"):
    d = make_document(doc_id, text, "uri")
    assert not hasattr(d, "reason"), d
    return d


def check_chunks(d, chunks, counter, max_tokens):
    """Offsets are exact, chunks ordered and disjoint, sized, and all text is covered."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    covered = []
    prev_end = 0
    for c in chunks:
        assert d.text[c.char_start : c.char_end] == c.text
        assert c.char_start >= prev_end
        prev_end = c.char_end
        assert 0 < c.token_count <= max_tokens
        assert counter.count([c.text])[0] <= max_tokens
        covered.append(c.text)
    assert "".join(d.text.split()) == "".join("".join(covered).split())


MD = """# Guide

Intro paragraph one. It has two sentences.

## Install

Run the installer. Then restart.

## Usage

### Basics

Call the function with care.

```python
def f():

    return 1
```

# Appendix

Last words here.
"""


def test_markdown_heading_paths():
    d = doc(MD)
    chunks = chunk_document(d, WORDS, 12)
    paths = [c.heading_path for c in chunks]
    assert ("Guide",) in paths
    assert ("Guide", "Install") in paths
    assert ("Appendix",) in paths
    # the heading-only "Usage" section is never a chunk of its own: it joins its first subsection
    usage = next(c for c in chunks if "## Usage" in c.text)
    assert "### Basics" in usage.text
    # a fenced code block is never split at its blank line
    assert any("```python\ndef f():\n\n    return 1\n```" in c.text for c in chunks)
    check_chunks(d, chunks, WORDS, 12)


RST = """PEP: 9999
Title: Example

Abstract
========

This PEP shows structure.

Specification
=============

Syntax
------

The syntax is simple.

Semantics
---------

The semantics are simple too.

Copyright
=========

Public domain.
"""


def test_rst_heading_paths_follow_adornment_order():
    sections = split_sections(doc(RST, "pep-9999.rst").text, "rst")
    assert [s.heading_path for s in sections] == [
        (),
        ("Abstract",),
        ("Specification",),
        ("Specification", "Syntax"),
        ("Specification", "Semantics"),
        ("Copyright",),
    ]


PY = '''"""Module docstring."""

import os

CONSTANT = 1


@decorator
def top(a, b):
    return a + b


class Thing:
    """A thing."""

    def method(self):
        return 1

    async def other(self):
        return 2


x = top(1, 2)
'''


def test_python_sections_by_definition():
    sections = split_sections(doc(PY, "m.py").text, "python")
    text = doc(PY, "m.py").text
    by_path = {s.heading_path: text[s.start : s.end] for s in sections}
    assert by_path[("top",)].startswith("@decorator\ndef top")
    assert by_path[("Thing",)].startswith("class Thing")
    assert by_path[("Thing", "method")].lstrip().startswith("def method")
    assert by_path[("Thing", "other")].lstrip().startswith("async def other")
    assert "x = top(1, 2)" in by_path[()] or any("x = top" in t for p, t in by_path.items() if p == ())


def test_python_syntax_error_falls_back_to_text():
    assert [s.heading_path for s in split_sections("def broken(:\n  pass", "python")] == [()]


def test_real_tokenizer_limits_and_no_mid_sentence_cuts(model_counter):
    counter, max_tokens = model_counter
    sentences = [f"Sentence number {i} talks about aerodynamic boundary layers and heat transfer." for i in range(120)]
    d = doc("# Long\n\n" + " ".join(sentences) + "\n", "long.md")
    chunks = chunk_document(d, counter, max_tokens)
    assert len(chunks) > 3
    check_chunks(d, chunks, counter, max_tokens)
    for c in chunks[1:]:
        assert c.text.startswith("Sentence number"), c.text[:40]
    for c in chunks:
        assert c.text.rstrip().endswith("transfer."), c.text[-40:]


def test_oversized_sentence_and_word_are_split(model_counter):
    counter, max_tokens = model_counter
    giant_word = "x" * 5000
    long_sentence = " ".join(["word"] * 600)
    d = doc(f"{long_sentence}\n\n{giant_word}\n", "t.txt")
    chunks = chunk_document(d, counter, max_tokens)
    check_chunks(d, chunks, counter, max_tokens)


def test_html_is_reduced_to_text_with_headings():
    d = make_document("page.html", "<html><head><style>x{}</style></head><body><h1>Title</h1><p>Hello <b>world</b>.</p>"
                      "<h2>Sub</h2><p>More.</p><script>evil()</script></body></html>", "uri")
    assert d.format == "html"
    assert d.text == "Title\n\nHello world.\n\nSub\n\nMore."
    assert [s.heading_path for s in document_sections(d)] == [("Title",), ("Title", "Sub")]


# -- properties --------------------------------------------------------------------------------

word = st.sampled_from(["alpha", "beta", "gamma", "delta", "wing", "flow", "mach", "drag", "lift", "heat"])
sentence = st.lists(word, min_size=2, max_size=9).map(lambda ws: " ".join(ws).capitalize() + ".")
paragraph = st.lists(sentence, min_size=1, max_size=6).map(" ".join)
section = st.lists(paragraph, min_size=1, max_size=6)
document = st.lists(section, min_size=1, max_size=7)


def render(sections):
    return "\n\n".join(f"## Section {i}\n\n" + "\n\n".join(paras) for i, paras in enumerate(sections)) + "\n"


@settings(max_examples=150, deadline=None)
@given(document, st.integers(8, 40))
def test_chunking_is_deterministic_and_exact(sections, max_tokens):
    d = doc(render(sections))
    first = chunk_document(d, WORDS, max_tokens)
    assert first == chunk_document(d, WORDS, max_tokens)
    check_chunks(d, first, WORDS, max_tokens)


def _section_spans(text):
    starts = [m.start() for m in re.finditer(r"^## Section", text, re.M)] + [len(text)]
    return list(zip(starts, starts[1:]))


def _interior_chunk_texts(d, chunks):
    """Texts of chunks lying inside one section, neither at its first nor at its last block."""
    out = {}
    for k, (s, e) in enumerate(_section_spans(d.text)):
        inside = [c for c in chunks if c.char_start >= s and c.char_end <= e]
        for c in inside:
            starts_section = d.text[s : c.char_start].strip() == d.text[s:e].split("\n\n")[0].strip() or c.char_start == s
            ends_section = not d.text[c.char_end : e].strip()
            if not starts_section and not ends_section:
                out.setdefault(k, []).append(c.text)
    return out


@settings(max_examples=150, deadline=None)
@given(document, st.data(), st.integers(10, 40))
def test_edit_inside_one_section_keeps_other_boundaries(sections, data, max_tokens):
    i = data.draw(st.integers(0, len(sections) - 1), label="edited section")
    p = data.draw(st.integers(0, len(sections[i]) - 1), label="edited paragraph")
    replacement = data.draw(paragraph, label="replacement")
    edited = [list(s) for s in sections]
    edited[i][p] = replacement
    before, after = doc(render(sections)), doc(render(edited))
    old, new = chunk_document(before, WORDS, max_tokens), chunk_document(after, WORDS, max_tokens)
    new_texts = {c.text for c in new}

    # everything before the section preceding the edit is untouched, offsets included
    spans = _section_spans(before.text)
    stable_end = spans[i - 1][0] if i >= 1 else 0
    old_prefix = [(c.char_start, c.char_end, c.text, c.heading_path) for c in old if c.char_end <= stable_end]
    new_prefix = [(c.char_start, c.char_end, c.text, c.heading_path) for c in new if c.char_end <= stable_end]
    assert old_prefix == new_prefix

    # interior chunks of every other section keep their boundaries (their text reappears)
    for k, texts in _interior_chunk_texts(before, old).items():
        if k != i:
            for t in texts:
                assert t in new_texts


def test_chunks_are_indexed_with_the_document_title():
    text = "Wing flutter\n\n" + "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(6))
    titled = make_document("a.txt", text, "uri", {"title": "Wing   flutter"})
    plain = make_document("a.txt", text, "uri")
    chunks = chunk_document(titled, WORDS, 80)
    assert len(chunks) > 1
    first, *later = chunks
    # the first chunk already begins with the title: nothing is added to it
    assert first.context == "" and first.indexed_text == first.text
    for c in later:
        assert c.context == "Wing flutter"
        assert c.indexed_text == "Wing flutter\n\n" + c.text
        assert c.text == titled.text[c.char_start:c.char_end]  # offsets still index the source
        assert c.token_count <= 80  # the chunk itself fits the limit
    # the hash covers what is embedded, so the same text under another title is another chunk
    assert [c.chunk_hash for c in chunk_document(plain, WORDS, 80)][1:] != [c.chunk_hash for c in later]
    # a title too long to be worth its tokens is dropped
    # the title does not change where chunks fall
    assert [(c.char_start, c.char_end) for c in chunk_document(plain, WORDS, 80)] == [(c.char_start, c.char_end) for c in chunks]
    long_title = make_document("a.txt", text, "uri", {"title": "t " * 11})
    assert all(c.context == "" for c in chunk_document(long_title, WORDS, 80))


# -- heading context -------------------------------------------------------------------------

NESTED = ("# Guide\n\n## Install\n\n" + "\n\n".join(f"Step {i} copies files and checks every checksum twice." for i in range(8))
          + "\n\n### Offline\n\n" + "\n\n".join(f"Mirror {i} serves wheels without a network." for i in range(8)) + "\n")


def test_chunks_are_indexed_with_title_and_heading_path_not_in_their_text():
    titled = make_document("guide.md", NESTED, "uri", {"title": "Handbook"})
    chunks = chunk_document(titled, WORDS, 64, context="headings")
    assert len({c.heading_path for c in chunks}) >= 2
    default = chunk_document(titled, WORDS, 64)  # "section": the title and the innermost heading
    assert [(c.char_start, c.char_end) for c in default] == [(c.char_start, c.char_end) for c in chunks]
    for c, d in zip(chunks, default):
        opens = c.text.split("\n")[0].lstrip("# ") == c.heading_path[-1]  # a chunk opening with its heading
        own = c.heading_path[:-1] if opens else c.heading_path
        line = " > ".join(("Handbook", *own))
        assert d.context == " > ".join(("Handbook", *own[-1:]))
        assert c.context == line
        assert c.indexed_text == f"{line}\n\n{c.text}"  # what is embedded and BM25-indexed
        assert c.text == titled.text[c.char_start:c.char_end] and not c.text.startswith(line)  # the source's own text
        assert c.token_count <= 64 and WORDS.count([c.text])[0] <= 64  # the context does not eat the budget
    assert any(c.heading_path == ("Guide", "Install", "Offline") for c in chunks)
    # switching the context changes what is embedded, never where chunks fall
    for mode, expected in (("title", lambda c: "Handbook"), ("none", lambda c: "")):
        other = chunk_document(titled, WORDS, 64, context=mode)
        assert [(c.char_start, c.char_end, c.heading_path) for c in other] == [
            (c.char_start, c.char_end, c.heading_path) for c in chunks]
        assert [c.context for c in other] == [expected(c) for c in other]
        assert {c.chunk_hash for c in other}.isdisjoint(c.chunk_hash for c in chunks)
    with pytest.raises(ValueError, match="chunk context 'all'"):
        chunk_document(titled, WORDS, 64, context="all")


def test_a_long_context_line_keeps_what_fits():
    long_path = ("Alpha beta gamma delta epsilon zeta", "Eta theta iota kappa lambda mu", "Nu xi omicron")
    assert context_line("Title here", long_path, WORDS, 160, "headings") == " > ".join(("Title here", *long_path))
    assert context_line("Title here", long_path, WORDS, 48, "headings") == "Title here > Nu xi omicron"  # 6 words
    assert context_line("Title here", long_path, WORDS, 24, "headings") == "Nu xi omicron"
    assert context_line("A much longer document title", long_path, WORDS, 16, "headings") == ""
    assert context_line("Title here", long_path, WORDS, 160) == "Title here > Nu xi omicron"  # section: innermost
    assert context_line("A much longer document title", long_path, WORDS, 24) == "Nu xi omicron"
    for mode in ("headings", "section"):  # the title is not repeated
        assert context_line("Guide", ("Guide", "Install"), WORDS, 160, mode) == "Guide > Install"
    assert context_line("Guide", ("Install",), WORDS, 160, "title") == "Guide"


def test_chunker_version_names_the_context_and_the_cuts():
    assert chunker_version("m", 254) != chunker_version("m", 254, context="title")
    assert "context=section" in chunker_version("m", 254) and "sections-v3" in chunker_version("m", 254)


# -- content-defined cuts in heading-less text -------------------------------------------------

def _plain_text(paragraphs):
    return "\n\n".join(" ".join(p) for p in paragraphs) + "\n"


# sentences are distinct (a running number), as real sentences nearly always are
numbered = st.lists(st.lists(word, min_size=1, max_size=8), min_size=1, max_size=5)
plain = st.lists(numbered, min_size=2, max_size=30)


def _numbered(raw, offset=0):
    n = offset
    out = []
    for para in raw:
        sentences = []
        for ws in para:
            n += 1
            sentences.append(f"Item{n} " + " ".join(ws) + ".")
        out.append(sentences)
    return out


def _edit(data, paragraphs):
    kind = data.draw(st.sampled_from(["sentence_added", "paragraph_deleted", "paragraph_inserted"]), label="kind")
    edited = [list(p) for p in paragraphs]
    p = data.draw(st.integers(0, len(edited) - 1), label="paragraph")
    if kind == "sentence_added":
        edited[p].insert(data.draw(st.integers(0, len(edited[p])), label="at"), "Inserted sentence about gliders.")
    elif kind == "paragraph_deleted":
        del edited[p]
    else:
        new = _numbered(data.draw(numbered, label="new paragraph"), offset=10_000)
        edited.insert(p, [s for para in new for s in para])
    return edited


def _words_between(text, start, end):
    return len(text[start:end].split())


@settings(max_examples=200, deadline=None)
@given(plain, st.data(), st.integers(12, 48))
def test_an_edit_recuts_only_its_neighbourhood(raw, data, max_tokens):
    paragraphs = _numbered(raw)
    before_text = _plain_text(paragraphs)
    after_text = _plain_text(_edit(data, paragraphs))
    before, after = doc(before_text, "a.txt"), doc(after_text, "a.txt")
    old, new = chunk_document(before, WORDS, max_tokens), chunk_document(after, WORDS, max_tokens)
    check_chunks(before, old, WORDS, max_tokens)
    check_chunks(after, new, WORDS, max_tokens)
    # the edited span of each text: what lies between their common prefix and common suffix
    prefix = len(os.path.commonprefix([before_text, after_text]))
    suffix = len(os.path.commonprefix([before_text[prefix:][::-1], after_text[prefix:][::-1]]))
    edit_end_old, shift = len(before_text) - suffix, len(after_text) - len(before_text)
    kept = {(c.char_start, c.char_end, c.text) for c in new}
    reach = 3 * max_tokens  # in words (tokens): cuts depend on the text within a window, stretches are short
    for c in old:
        if _words_between(before_text, c.char_end, prefix) >= reach and c.char_end <= prefix:
            assert (c.char_start, c.char_end, c.text) in kept  # before the edit: untouched
        elif c.char_start >= edit_end_old and _words_between(before_text, edit_end_old, c.char_start) >= reach:
            assert (c.char_start + shift, c.char_end + shift, c.text) in kept  # after it: moved, not re-cut


@settings(max_examples=100, deadline=None)
@given(plain, st.integers(12, 48))
def test_content_defined_cuts_are_deterministic_and_exact(raw, max_tokens):
    d = doc(_plain_text(_numbered(raw)), "a.txt")
    chunks = chunk_document(d, WORDS, max_tokens)
    check_chunks(d, chunks, WORDS, max_tokens)
    assert chunk_document(d, WORDS, max_tokens) == chunks

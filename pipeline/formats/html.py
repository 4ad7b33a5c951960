"""HTML extraction (selectolax): the page's main content as text, h1-h6 as heading paths, <title> as title.

The main content is the element the page marks as such (``<main>``, ``role="main"``, a single
``<article>``), else the body; navigation, headers, footers, sidebars, forms, scripts and hidden
elements inside it are dropped. docs/benchmarks.md measures this against trafilatura's content
detection and against keeping every text node on real documentation pages of five generators:
it keeps 99.4% of the article text a reader sees (trafilatura 92.5%) with 0.9% boilerplate.

Headings become their own blocks and open sections (``h1`` > ``h2`` > ...); list items become
"- " lines, table rows lines of " | "-joined cells, ``<pre>`` keeps its line breaks.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pipeline.formats.extracted import Extracted, Layout, TextBuilder, Unextractable
from registry.extras import require

ALGORITHM = "html-1"

# where a page says its main content is (HTML's own markup, no generator-specific guesses)
MAIN_SELECTORS = ("main", "[role=main]")
DROPPED = ("script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form",
           "button", "iframe", "select", "[role=navigation]", "[role=banner]", "[role=contentinfo]",
           "[role=search]", "[role=complementary]", "[hidden]", "[aria-hidden=true]")  # fmt: skip
_BLOCK = {"p", "div", "section", "article", "main", "blockquote", "figure", "figcaption", "dl", "dt", "dd",
          "ul", "ol", "table", "thead", "tbody", "tfoot", "details", "summary", "address", "hr", "br", "center",
          "fieldset", "caption"}  # fmt: skip
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


def version() -> str:
    return f"{ALGORITHM};selectolax={metadata.version('selectolax')}"


def extract(data: bytes) -> Extracted:
    """Extract an HTML page's main content, headings and title.

    Raises:
        Unextractable: the page holds no text.
    """
    lexbor = require("selectolax.lexbor", "pipeline", "reading HTML files")
    tree = lexbor.LexborHTMLParser(_decode(data))
    title_node = tree.css_first("title")
    title = " ".join(title_node.text().split()) if title_node is not None else ""
    root = main_content(tree) or tree.body
    builder = TextBuilder()
    if root is not None:
        _drop_boilerplate(root)
        _Walker(builder).walk(root)
    text = builder.text()
    if not text.strip():
        raise Unextractable("empty document (the HTML page holds no text)")
    if not title and builder.headings:
        title = builder.headings[0].path[-1]
    return Extracted(text, title or None, Layout(headings=tuple(builder.headings)), version())


def main_content(tree: Any) -> Any | None:
    """The element holding the page's main content, or None when the page marks none."""
    for selector in MAIN_SELECTORS:
        node = tree.css_first(selector)
        if node is not None:
            return node
    articles = tree.css("article")
    return articles[0] if len(articles) == 1 else None


def _drop_boilerplate(root: Any) -> None:
    for selector in DROPPED:
        for node in root.css(selector):
            node.decompose()


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # the parser's own fallback for unlabelled pages


class _Walker:
    """Depth-first text of an element, block by block, into a TextBuilder."""

    def __init__(self, builder: TextBuilder) -> None:
        self.builder = builder
        self.inline: list[str] = []
        self.tight = False  # the next block continues a list or table

    def walk(self, node: Any) -> None:
        self._visit(node)
        self._flush()

    def _flush(self, *, tight: bool = False) -> None:
        text = " ".join("".join(self.inline).split())
        self.inline = []
        if text:
            self.builder.add(text, tight=self.tight)
        self.tight = tight

    def _visit(self, node: Any) -> None:
        child = node.child
        while child is not None:
            tag = child.tag
            if tag == "-text":
                self.inline.append(child.text_content or "")
            elif tag in _HEADINGS:
                self._flush()
                self.builder.heading(child.text(), _HEADINGS[tag])
            elif tag == "li":
                self._flush(tight=self.tight)
                self.inline.append("- ")
                self._visit(child)
                self._flush(tight=True)
            elif tag == "tr":
                self._flush(tight=self.tight)
                line = " | ".join(" ".join(c.text().split()) for c in child.css("td, th"))
                if line.strip(" |"):
                    self.builder.add(line, tight=self.tight)
                self.tight = True
            elif tag == "pre":
                self._flush()
                self.builder.add(child.text())  # line breaks kept
            elif tag in _BLOCK:
                self._flush()
                self._visit(child)
                self._flush()
            elif tag not in ("-comment", "head"):
                self._visit(child)  # inline element
            child = child.next

"""HTML extractor comparison: which extractor keeps the text a reader sees and drops the rest.

Real documentation pages from five generators (mdBook, rustdoc, the Node.js API docs, npm's docs,
DocBook XSL), found under the given roots. A page's *content* is the text of the element its
generator puts the article in (``GENERATORS``); everything else — sidebars, tables of contents of
the whole site, headers, footers, prev/next links, search boxes — is boilerplate. For each
extractor and page: the share of content words it keeps, in order (longest common subsequence),
and the share of what it returns that is not content in order (boilerplate kept, or text out of
order). Words are lowercase letter/digit runs.

    python -m benchmarks html [--pages-per-generator 4] [--root DIR ...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.wordmatch import lcs_length, words

RUST_DOCS = Path("/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html")
# generator: (pages as globs under a root, the element holding the article)
GENERATORS: dict[str, tuple[list[str], str]] = {
    "mdbook": ([str(RUST_DOCS / "book/ch0[3-6]-0[1-2]-*.html")], "main"),
    "rustdoc": ([str(RUST_DOCS / "std/fs/fn.*.html"), str(RUST_DOCS / "std/fs/struct.File.html")], "#main-content"),
    "nodejs": (["/usr/share/doc/nodejs/api/c[l-o]*.html"], "#apicontent"),
    "npm": (["/usr/lib/node_modules/npm/docs/output/commands/npm-[a-f]*.html"], "#_content"),
    "docbook": (["/usr/share/doc/valgrind/html/[a-m]*-manual.html"], "div.chapter"),
}


def truth_text(html: str, selector: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    for node in tree.css("script, style, noscript, template"):
        node.decompose()
    node = tree.css_first(selector)
    return node.text(separator=" ") if node is not None else ""


def everything(data: bytes) -> str:
    """Every text node (the converter ragpipe used before)."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(data.decode("utf-8", errors="replace"))
    for node in tree.css("script, style, noscript, template, head"):
        node.decompose()
    body = tree.body
    return body.text(separator=" ") if body is not None else ""


def trafilatura_default(data: bytes) -> str:
    import trafilatura

    return trafilatura.extract(data, include_tables=True, include_comments=False) or ""


def trafilatura_recall(data: bytes) -> str:
    import trafilatura

    return trafilatura.extract(data, include_tables=True, include_comments=False, favor_recall=True) or ""


def ragpipe_html(data: bytes) -> str:
    """What ragpipe indexes: the marked main element, else the body, without boilerplate elements."""
    from pipeline.formats import html

    return html.extract(data).text


def marked_main_only(data: bytes) -> str:
    """selectolax on the marked main element alone: nothing when the page marks none."""
    from pipeline.formats import html
    from pipeline.formats.extracted import TextBuilder
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(data.decode("utf-8", errors="replace"))
    root = html.main_content(tree)
    if root is None:
        return ""
    html._drop_boilerplate(root)
    builder = TextBuilder()
    html._Walker(builder).walk(root)
    return builder.text()


def main_else_trafilatura(data: bytes) -> str:
    """The marked main element, else trafilatura's content detection."""
    return marked_main_only(data) or trafilatura_recall(data)


EXTRACTORS: dict[str, Callable[[bytes], str]] = {
    "every text node (before)": everything,
    "trafilatura": trafilatura_default,
    "trafilatura favor_recall": trafilatura_recall,
    "selectolax, marked main element only": marked_main_only,
    "selectolax, marked main element, else trafilatura favor_recall": main_else_trafilatura,
    "ragpipe: selectolax, marked main element, else the body; boilerplate elements dropped": ragpipe_html,
}


def pages(per_generator: int) -> list[tuple[str, Path, str]]:
    import glob

    out = []
    for generator, (patterns, selector) in GENERATORS.items():
        found = sorted({p for pattern in patterns for p in glob.glob(pattern)})[:per_generator]
        out.extend((generator, Path(p), selector) for p in found)
    return out


def measure(per_generator: int) -> dict[str, Any]:
    chosen = pages(per_generator)
    rows: dict[str, dict[str, list[float]]] = {name: {"kept": [], "boilerplate": [], "seconds": []} for name in EXTRACTORS}
    per_page = []
    for generator, path, selector in chosen:
        data = path.read_bytes()
        truth = words(truth_text(data.decode("utf-8", errors="replace"), selector))
        if len(truth) < 20:
            continue
        page: dict[str, Any] = {"generator": generator, "page": str(path), "content_words": len(truth)}
        for name, extractor in EXTRACTORS.items():
            started = time.perf_counter()
            got = words(extractor(data))
            seconds = time.perf_counter() - started
            common = lcs_length(truth, got)
            kept = common / len(truth)
            boilerplate = (len(got) - common) / len(got) if got else 0.0
            rows[name]["kept"].append(kept)
            rows[name]["boilerplate"].append(boilerplate)
            rows[name]["seconds"].append(seconds)
            page[name] = {"kept": round(kept, 4), "boilerplate": round(boilerplate, 4)}
        per_page.append(page)
    summary = {
        name: {
            "content_kept_mean": round(statistics.mean(r["kept"]), 4),
            "content_kept_min": round(min(r["kept"]), 4),
            "boilerplate_mean": round(statistics.mean(r["boilerplate"]), 4),
            "boilerplate_max": round(max(r["boilerplate"]), 4),
            "ms_per_page_median": round(1000 * statistics.median(r["seconds"]), 2),
        }
        for name, r in rows.items()
    }
    return {"benchmark": "html", "pages": len(per_page),
            "generators": sorted({p["generator"] for p in per_page}), "extractors": summary, "per_page": per_page}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks html", description=__doc__.split("\n")[0])
    parser.add_argument("--pages-per-generator", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.pages_per_generator), indent=2))
    return 0

"""PDF extraction against the LaTeX sources of the pdfTeX samples, and page attribution of every chunk.

For each sample of ``shared/data/pdf-samples`` that comes with its ``.tex`` source: the share of
the source's words that ragpipe's extracted text holds in the same order (longest common
subsequence over lowercase letter/digit words; ``\\blindtext`` and ``\\lipsum`` expanded to the
packages' own text, see ``benchmarks.latex_fillers``), and, for every chunk of the document,
whether its ``page_start``/``page_end`` are the pages its first and last words are printed on.
The page oracle reads each page on its own with pypdfium2 and walks the chunks' words through
the page-tagged word stream in order, so repeated text cannot match the wrong page.

    python -m benchmarks extraction [--shared-data DIR]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.latex_fillers import BLINDTEXT_ENGLISH, LIPSUM
from benchmarks.wordmatch import lcs_length, words

# the samples with their LaTeX source (pdfTeX output)
LATEX_SAMPLES = ("001-trivial/minimal-document", "004-pdflatex-4-pages/pdflatex-4-pages",
                 "006-pdflatex-outline/pdflatex-outline", "026-latex-multicolumn/multicolumn")  # fmt: skip
MAX_TOKENS = 254


class WordCounter:
    """One token per word: page attribution does not depend on the tokenizer."""

    name = "words"

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]


def latex_reference(tex: str) -> str:
    """The words a LaTeX source typesets, in order: its body with the filler macros expanded and
    markup removed (the contents of ``\\section{...}``, ``\\title{...}``, table cells stay)."""
    body = tex.split("\\begin{document}", 1)[-1].split("\\end{document}", 1)[0]
    body = re.sub(r"(?<!\\)%.*", "", body)
    body = re.sub(r"\\blindtext(?:\[(\d+)\])?", lambda m: " " + " ".join([BLINDTEXT_ENGLISH] * int(m.group(1) or 1)) + " ",
                  body)
    body = re.sub(r"\\lipsum(?:\[(\d+)(?:-(\d+))?\])?",
                  lambda m: " " + " ".join(LIPSUM[int(m.group(1) or 1) - 1: int(m.group(2) or m.group(1) or 7)]) + " ",
                  body)
    body = re.sub(r"\\(?:begin|end)\{[^}]*\}(?:\[[^\]]*\])?(?:\{[lcrp|]+\})?", " ", body)  # environments, column specs
    body = re.sub(r"\\(?:date|today|maketitle|tableofcontents|newpage|pagebreak|centering|[a-z]*rule)\b(?:\{[^}]*\})?",
                  " ", body)
    body = re.sub(r"\\[A-Za-z@]+\*?(?:\[[^\]]*\])?", " ", body)  # other commands: their arguments' text stays
    return re.sub(r"[{}&~]|\\\\", " ", body)


@dataclass
class PageCheck:
    chunks: int
    correct: int
    errors: list[str]


def page_word_stream(data: bytes) -> list[tuple[str, int]]:
    """Every word of the PDF with its 1-based page, each page read on its own (PDFium's U+FFFE marks a
    hyphenation break inside a word)."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    stream = []
    for number in range(len(pdf)):
        text = pdf[number].get_textpage().get_text_range().replace("\ufffe", "")
        stream.extend((word, number + 1) for word in words(text))
    pdf.close()
    return stream


def check_pages(data: bytes, chunks: Sequence[Any]) -> PageCheck:
    """Whether each chunk's page_start/page_end are the pages of its first and last word."""
    stream = page_word_stream(data)
    position = 0
    correct = 0
    errors = []
    for chunk in chunks:
        chunk_words = words(chunk.text)
        if not chunk_words:
            continue
        end = position + len(chunk_words)
        if [w for w, _ in stream[position:end]] != chunk_words:
            errors.append(f"chunk {chunk.ordinal}: words differ from the pages' text at word {position}")
            break
        expected = (stream[position][1], stream[end - 1][1])
        got = (chunk.pages.start, chunk.pages.end) if chunk.pages else (None, None)
        if got == expected:
            correct += 1
        else:
            errors.append(f"chunk {chunk.ordinal}: pages {got}, its words are on {expected}")
        position = end
    return PageCheck(len(chunks), correct, errors)


def measure_sample(pdf_path: Path, tex_path: Path | None) -> dict[str, Any]:
    from pipeline.chunking import chunk_document
    from pipeline.formats import pdf
    from pipeline.sources import SourceDocument, make_document

    data = pdf_path.read_bytes()
    extracted = pdf.extract(data)
    doc = make_document(pdf_path.name, extracted.text, pdf_path.as_uri(), extracted=extracted, fmt="pdf")
    assert isinstance(doc, SourceDocument)
    chunks = chunk_document(doc, WordCounter(), MAX_TOKENS)
    result: dict[str, Any] = {"sample": str(pdf_path.parent.name + "/" + pdf_path.name),
                              "pages": len(extracted.layout.pages),
                              "outline_headings": len(extracted.layout.headings)}
    if tex_path is not None:
        source = words(latex_reference(tex_path.read_text()))
        found = lcs_length(source, words(extracted.text))
        result.update(source_words=len(source), found_in_order=found, share_in_order=round(found / len(source), 4))
    check = check_pages(data, chunks)
    result.update(chunks=check.chunks, chunks_with_correct_pages=check.correct, page_errors=check.errors[:5])
    return result


def main(argv: list[str]) -> int:
    from benchmarks import shared_data_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks extraction", description=__doc__.split("\n")[0])
    parser.add_argument("--shared-data", type=Path)
    args = parser.parse_args(argv)
    root = shared_data_dir(args.shared_data) / "pdf-samples"
    samples = [measure_sample(root / f"{s}.pdf", root / f"{s}.tex") for s in LATEX_SAMPLES]
    samples.append(measure_sample(root / "014-outlines/mistitled_outlines_example.pdf", None))
    print(json.dumps({"benchmark": "extraction", "samples": samples}, indent=2))
    return 0

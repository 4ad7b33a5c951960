"""Document formats: turn a PDF, DOCX or HTML file into the text discovery hashes and chunks.

One module per format (``pdf``, ``docx``, ``html``), each with ``extract(data) -> Extracted`` and
``version()``; discovery calls them through :class:`~pipeline.formats.isolation.IsolatedExtractor`
(a worker process under a time and memory limit). An extractor's version is part of each
document's chunker configuration (``pipeline.diff.document_chunker``), so upgrading one extractor
re-chunks exactly the documents of its format.
"""

from __future__ import annotations

from pipeline.formats.extracted import Extracted, HeadingSpan, Layout, PageRange, PageSpan, Unextractable

EXTRACTED_FORMATS = {".pdf": "pdf", ".docx": "docx", ".html": "html", ".htm": "html"}

__all__ = ["EXTRACTED_FORMATS", "Extracted", "HeadingSpan", "Layout", "PageRange", "PageSpan", "Unextractable",
           "extract_document", "extractor_version"]


def extractor_version(fmt: str) -> str:
    """The version of the extractor of ``fmt`` (its algorithm and library release)."""
    return _module(fmt).version()


def extract_document(fmt: str, data: bytes, *, max_unzipped_bytes: int | None = None) -> Extracted:
    """Extract one document in this process (no limits; discovery uses the isolated worker).

    Raises:
        Unextractable: the document cannot be read; the message is the reason.
    """
    if fmt == "docx":
        from pipeline.formats import docx

        return docx.extract(data, max_unzipped_bytes=max_unzipped_bytes)
    return _module(fmt).extract(data)  # type: ignore[no-any-return]


def _module(fmt: str):  # type: ignore[no-untyped-def]
    if fmt == "pdf":
        from pipeline.formats import pdf

        return pdf
    if fmt == "docx":
        from pipeline.formats import docx

        return docx
    if fmt == "html":
        from pipeline.formats import html

        return html
    raise ValueError(f"no extractor for format {fmt!r}")

"""PDF, DOCX and HTML documents: extraction on real files, pages and headings on chunks and hits, skip
reasons, the per-document time and memory limit, zip bombs, and the run end to end on a real PostgreSQL."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
import zlib

import pyarrow.parquet as pq
import pytest

from benchmarks.extraction import LATEX_SAMPLES, WordCounter, check_pages, latex_reference
from benchmarks.wordmatch import lcs_length, words
from conftest import REPO, write_tree
from pipeline.chunking import chunk_document
from pipeline.config import IndexConfig
from pipeline.diff import plan_changes
from pipeline.formats import Unextractable, docx, html, pdf
from pipeline.formats.isolation import ExtractLimits, IsolatedExtractor
from pipeline.hashing import normalize_text
from pipeline.runner import artifact_store, run_index
from pipeline.sources import SourceDocument, make_document, scan_source
from registry import Registry, RegistryConfig
from retrieval import Retriever
from retrieval.artifacts import CHUNKS_FILE, MANIFEST, sha256_file

SAMPLES = "pdf-samples"


def sample(shared_data, name):
    return (shared_data / SAMPLES / name).read_bytes()


def as_document(name, extracted, fmt):
    doc = make_document(name, extracted.text, f"file:///{name}", extracted=extracted, fmt=fmt)
    assert isinstance(doc, SourceDocument)
    return doc


# -- generated files -------------------------------------------------------------------------------


def make_pdf(pages, *, compress=True, page_labels=None):
    """A PDF with one content stream per page (raw PDF operators), written object by object."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R" + (b" /PageLabels " + page_labels if page_labels else b"") + b" >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages))).encode()
    objects.append(b"<< /Type /Pages /Kids [" + kids + b"] /Count " + str(len(pages)).encode() + b" >>")
    font = 3 + 2 * len(pages)
    for i, content in enumerate(pages):
        stream = zlib.compress(content, 9) if compress else content
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 "
                       + str(font).encode() + b" 0 R >> >> /Contents " + str(4 + 2 * i).encode() + b" 0 R >>")
        objects.append(b"<< " + (b"/Filter /FlateDecode " if compress else b"") + b"/Length "
                       + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def text_page(*lines):
    ops = b"BT /F1 12 Tf 72 720 Td 14 TL " + b" ".join(b"(" + line.encode() + b") Tj T*" for line in lines) + b" ET"
    return ops


def slow_pdf(operators):
    """A real PDF whose one page shows ``operators`` single characters: small on disk, costly to read
    (PDFium builds an object per operator: 2,000,000 of them take about 10 s and 1.1 GB)."""
    return make_pdf([b"BT /F1 12 Tf 72 720 Td " + b"(A) Tj " * operators + b"ET"])


def inflating_pdf(expanded_mib):
    """A real PDF whose content stream inflates from about 1 MB to ``expanded_mib`` MiB."""
    return make_pdf([b"BT /F1 12 Tf 72 720 Td (Hi) Tj ET " + b" " * (expanded_mib << 20)])


def make_docx(build):
    import docx as python_docx

    document = python_docx.Document()
    build(document)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def report_docx(document):
    document.add_paragraph("Quarterly Report", style="Title")
    document.add_paragraph("Opening words before any heading.")
    document.add_heading("Revenue", level=1)
    document.add_paragraph("Revenue grew in every region.")
    document.add_paragraph("first bullet", style="List Bullet")
    document.add_paragraph("second bullet", style="List Bullet")
    document.add_heading("By region", level=2)
    table = document.add_table(rows=3, cols=2)
    for i, row in enumerate([("Region", "Revenue"), ("North", "12"), ("South", "9")]):
        for j, value in enumerate(row):
            table.cell(i, j).text = value
    document.add_paragraph("step one", style="List Number")
    document.add_paragraph("step two", style="List Number")
    document.add_heading("Costs", level=1)
    document.add_paragraph("Costs fell by a tenth.")


def long_report_docx(document):
    """The report with sections long enough to be chunks of their own at the model's 254 tokens."""
    report_docx(document)
    for heading, topic in [("Outlook", "demand"), ("Risks", "supply")]:
        document.add_heading(heading, level=1)
        document.add_heading(f"{heading} by region", level=2)
        for i in range(12):
            document.add_paragraph(f"Paragraph {i} on {topic}: the northern and southern regions report {topic} "
                                   f"figures that moved by {i} percent against the previous quarter's plan.")


def zip_bomb_docx(expanded_mib):
    """A real DOCX with one more member: ``expanded_mib`` MiB of zeros that deflate to about 0.1% of that."""
    base = make_docx(report_docx)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        with dst.open("word/media/image1.png", "w") as member:
            block = bytes(1 << 20)
            for _ in range(expanded_mib):
                member.write(block)
    return out.getvalue()


PAGE = b"""<!doctype html><html><head><title>Install guide &amp; notes</title><style>p{}</style></head><body>
<header><a href="/">Site</a> <h1>Example Docs</h1></header>
<nav><ul><li><a href="/a">Home</a></li><li><a href="/b">Download everything</a></li></ul></nav>
<main><h1>Installing</h1><p>Run the <code>setup</code> command once.</p>
<h2>Options</h2><ul><li>quiet <b>mode</b></li><li>verbose mode</li></ul>
<table><tr><th>flag</th><th>meaning</th></tr><tr><td>-q</td><td>quiet</td></tr></table>
<h3>Proxy</h3><p>Set the proxy variable first.</p><script>track()</script>
<aside>Related: other guides</aside></main>
<footer>Copyright 2026 Example Corp</footer></body></html>"""


# -- PDF on the real samples ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LATEX_SAMPLES)
def test_pdf_text_holds_the_latex_source_words_in_order(shared_data, name):
    extracted = pdf.extract(sample(shared_data, f"{name}.pdf"))
    source = words(latex_reference((shared_data / SAMPLES / f"{name}.tex").read_text()))
    assert len(source) >= 100
    assert lcs_length(source, words(extracted.text)) / len(source) >= 0.99
    assert normalize_text(extracted.text) == extracted.text  # what is hashed is what the offsets index


@pytest.mark.parametrize("name", ["004-pdflatex-4-pages/pdflatex-4-pages.pdf", "006-pdflatex-outline/pdflatex-outline.pdf",
                                  "014-outlines/mistitled_outlines_example.pdf", "026-latex-multicolumn/multicolumn.pdf"])
def test_every_chunk_of_a_multi_page_sample_has_its_pages(shared_data, name):
    data = sample(shared_data, name)
    extracted = pdf.extract(data)
    chunks = chunk_document(as_document(name, extracted, "pdf"), WordCounter(), 120)
    check = check_pages(data, chunks)
    assert check.errors == [] and check.correct == len(chunks) > 2
    assert [p.number for p in extracted.layout.pages] == list(range(1, len(extracted.layout.pages) + 1))
    for chunk in chunks:
        assert extracted.text[chunk.char_start:chunk.char_end] == chunk.text


def test_the_outline_is_the_heading_path(shared_data):
    extracted = pdf.extract(sample(shared_data, "006-pdflatex-outline/pdflatex-outline.pdf"))
    assert [h.path for h in extracted.layout.headings] == [("Foo",), ("Bar",), ("Baz",)] * 3
    assert extracted.text[extracted.layout.headings[1].start:].startswith("2 Bar\n")
    chunks = chunk_document(as_document("o.pdf", extracted, "pdf"), WordCounter(), 120)
    for chunk in chunks:  # a chunk's path is that of the section it starts in; the contents page has none
        opened = [h for h in extracted.layout.headings if h.start <= chunk.char_start]
        assert chunk.heading_path == (opened[-1].path if opened else ())
    assert {c.heading_path for c in chunks} >= {(), ("Foo",), ("Baz",)}
    assert any(c.pages.start < c.pages.end for c in chunk_document(as_document("o.pdf", extracted, "pdf"),
                                                                      WordCounter(), 254))  # across a page break
    # misleading titles still give the outline's tree, not the text's headings
    nested = pdf.extract(sample(shared_data, "014-outlines/mistitled_outlines_example.pdf"))
    paths = [h.path for h in nested.layout.headings]
    assert paths[:5] == [("First",), ("First", "Second"), ("First", "Third"), ("First", "Fourth"),
                         ("First", "Fourth", "Fifth")]


def test_pdf_title_from_metadata_else_first_heading(shared_data):
    assert pdf.extract(sample(shared_data, "011-google-doc-document/google-doc-document.pdf")).title == \
        "PDF Example Document"
    assert pdf.extract(sample(shared_data, "006-pdflatex-outline/pdflatex-outline.pdf")).title == "Foo"
    assert pdf.extract(sample(shared_data, "004-pdflatex-4-pages/pdflatex-4-pages.pdf")).title is None


def test_page_labels_where_the_file_defines_them():
    data = make_pdf([text_page(f"Page {i} says something worth reading here.") for i in range(4)],
                    page_labels=b"<< /Nums [0 << /S /r >> 2 << /S /D >>] >>")
    extracted = pdf.extract(data)
    assert [(p.number, p.label) for p in extracted.layout.pages] == [(1, "i"), (2, "ii"), (3, "1"), (4, "2")]
    chunks = chunk_document(as_document("l.pdf", extracted, "pdf"), WordCounter(), 12)
    assert [(c.pages.start, c.pages.label_start) for c in chunks] == [(1, "i"), (2, "ii"), (3, "1"), (4, "2")]


def test_encrypted_image_only_and_damaged_pdfs_each_say_why(shared_data):
    with pytest.raises(Unextractable, match=r"^encrypted PDF: it needs a password"):
        pdf.extract(sample(shared_data, "005-libreoffice-writer-password/libreoffice-writer-password.pdf"))
    with pytest.raises(Unextractable, match=r"^no text layer \(scanned or image-only PDF: 6 pages, 6 of them with"):
        pdf.extract(sample(shared_data, "007-imagemagick-images/imagemagick-images.pdf"))
    truncated = sample(shared_data, "004-pdflatex-4-pages/pdflatex-4-pages.pdf")[:12000]
    with pytest.raises(Unextractable, match=r"^damaged PDF: "):
        pdf.extract(truncated)
    # short real text is text: Arabic on rotated pages, a one-line link
    rotated = pdf.extract(sample(shared_data, "015-arabic/habibi-rotated.pdf"))
    assert len(rotated.layout.pages) == 4 and all(p.end - p.start > 16 for p in rotated.layout.pages)
    assert len(pdf.extract(sample(shared_data, "016-libre-office-link/libre-office-link.pdf")).text) > 16


# -- limits: real hostile files ---------------------------------------------------------------------


def test_a_pdf_that_inflates_beyond_the_memory_limit_is_skipped_and_the_next_is_read(shared_data):
    bomb = inflating_pdf(1536)  # about 1.5 MB on disk
    assert len(bomb) < 2 << 20
    with IsolatedExtractor(ExtractLimits(memory_mb=1024)) as extractor:
        reason = extractor.extract("pdf", bomb)
        assert isinstance(reason, str) and reason.startswith("the extractor process died (signal ")
        assert "1024 MiB memory limit (RAGPIPE_EXTRACT_MEMORY_MB)" in reason
        after = extractor.extract("pdf", sample(shared_data, "001-trivial/minimal-document.pdf"))
        assert not isinstance(after, str) and after.text.startswith("Lorem ipsum")


def test_a_pdf_that_takes_too_long_is_stopped_at_the_time_limit(shared_data):
    slow = slow_pdf(600_000)  # about 3 s of PDFium work from a 7 kB file
    with IsolatedExtractor(ExtractLimits(timeout_s=0.5, memory_mb=4096)) as extractor:
        reason = extractor.extract("pdf", slow)
        assert reason == ("extraction took longer than the 0.5-second limit (RAGPIPE_EXTRACT_TIMEOUT); "
                          "the extractor was stopped")
        assert extractor._proc is None  # the worker was killed, not left running
        after = extractor.extract("pdf", sample(shared_data, "001-trivial/minimal-document.pdf"))
        assert not isinstance(after, str)
    with IsolatedExtractor(ExtractLimits(timeout_s=60, memory_mb=4096)) as extractor:
        assert not isinstance(extractor.extract("pdf", slow), str)  # the same file, given the time


def test_a_docx_zip_bomb_is_refused_before_it_is_inflated():
    bomb = zip_bomb_docx(200)
    assert len(bomb) < 1 << 20
    with IsolatedExtractor(ExtractLimits(max_unzipped_bytes=100 << 20)) as extractor:
        reason = extractor.extract("docx", bomb)
    assert isinstance(reason, str) and reason.startswith("refused as a zip bomb: its ")
    assert "over the 104857600-byte limit (RAGPIPE_MAX_UNZIPPED_BYTES)" in reason
    with pytest.raises(Unextractable, match="damaged DOCX: it is not a readable zip archive"):
        docx.extract(b"PK\x03\x04 not really a zip")


# -- DOCX and HTML ----------------------------------------------------------------------------------


def test_docx_headings_lists_and_tables():
    extracted = docx.extract(make_docx(report_docx))
    assert extracted.text == (
        "Quarterly Report\n\nOpening words before any heading.\n\nRevenue\n\nRevenue grew in every region.\n\n"
        "- first bullet\n- second bullet\n\nBy region\n\nRegion | Revenue\nNorth | 12\nSouth | 9\n\n"
        "1. step one\n2. step two\n\nCosts\n\nCosts fell by a tenth.")
    assert extracted.title == "Quarterly Report"
    assert [h.path for h in extracted.layout.headings] == [("Revenue",), ("Revenue", "By region"), ("Costs",)]
    chunks = chunk_document(as_document("r.docx", extracted, "docx"), WordCounter(), 8)
    path_of = {line: c.heading_path for c in chunks for line in c.text.split("\n")}
    assert path_of["Region | Revenue"] == ("Revenue", "By region") and path_of["Costs fell by a tenth."] == ("Costs",)
    assert all(c.pages is None for c in chunks)


def test_html_main_content_headings_and_title():
    extracted = html.extract(PAGE)
    assert extracted.title == "Install guide & notes"
    assert extracted.text == ("Installing\n\nRun the setup command once.\n\nOptions\n\n- quiet mode\n- verbose mode\n\n"
                              "flag | meaning\n-q | quiet\n\nProxy\n\nSet the proxy variable first.")
    assert [h.path for h in extracted.layout.headings] == [
        ("Installing",), ("Installing", "Options"), ("Installing", "Options", "Proxy")]
    without_main = PAGE.replace(b"<main>", b"<div>").replace(b"</main>", b"</div>")
    assert html.extract(without_main).text == extracted.text  # the body, less header, nav, aside, footer


def test_an_extractor_upgrade_rechunks_exactly_its_format(tmp_path, registry, embedder, shared_data):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha.\n", "page.html": PAGE.decode(),
                                        "r.docx": make_docx(report_docx)})
    shutil.copy(shared_data / SAMPLES / "001-trivial/minimal-document.pdf", src / "m.pdf")
    run_index(str(src), registry, embedder, IndexConfig())
    known = registry.document_states("docs")
    scan = scan_source(src)
    assert plan_changes(known, scan.documents, known["a.md"].chunker_version.split(";format=")[0]).unchanged == (
        "a.md", "m.pdf", "page.html", "r.docx")
    upgraded = [dataclasses.replace(d, extraction=d.extraction.replace("pdf-1;", "pdf-2;")) for d in scan.documents]
    plan = plan_changes(known, upgraded, known["a.md"].chunker_version.split(";format=")[0])
    assert [d.doc_id for d in plan.changed] == ["m.pdf"] and len(plan.unchanged) == 3


# -- through the registry, the version files and the retriever ---------------------------------------


@pytest.mark.db
def test_pages_reach_the_hits_and_older_versions_still_load(tmp_path, registry, registry_config, embedder, shared_data):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shared_data / SAMPLES / "004-pdflatex-4-pages/pdflatex-4-pages.pdf", src / "four.pdf")
    (src / "notes.md").write_text("# Notes\n\nPlain text has no pages.\n")
    summary = run_index(str(src), registry, embedder, IndexConfig())
    rows = [r for r in registry.active_chunks("docs") if r.doc_id == "four.pdf"]
    assert rows and all(1 <= r.page_start <= r.page_end <= 4 for r in rows)
    assert {r.page_start for r in rows} == {1, 2, 3, 4}
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False,
                        encoder=embedder) as retriever:
        hits = retriever.search("blind text information", k=20)
    pdf_hits = [h for h in hits if h.doc_id == "four.pdf"]
    md_hits = [h for h in hits if h.doc_id == "notes.md"]
    assert pdf_hits and all(h.page_start is not None and h.to_dict()["page_end"] >= h.page_start for h in pdf_hits)
    assert all(h.page_start is None and h.page_label_start is None for h in md_hits)
    row = {r.chunk_id: r for r in rows}
    assert all((h.page_start, h.page_end) == (row[h.chunk_id].page_start, row[h.chunk_id].page_end)
               for h in pdf_hits)

    # a version written before pages existed (a whole copy): its chunk table lacks the columns, which read as None
    from whole_copy import rewrite_as_whole_copy

    rewrite_as_whole_copy(registry, registry.home / "artifacts", "docs", summary.version, embedder.model_id)
    directory = artifact_store(IndexConfig(), registry.home).local_path("docs", summary.version)
    table = pq.read_table(directory / CHUNKS_FILE)
    pq.write_table(table.drop_columns(["page_start", "page_end", "page_label_start", "page_label_end"]),
                   directory / CHUNKS_FILE)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][CHUNKS_FILE] = {"sha256": sha256_file(directory / CHUNKS_FILE),
                                      "bytes": (directory / CHUNKS_FILE).stat().st_size}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False,
                        encoder=embedder) as retriever:
        old = retriever.search("blind text information", k=5)
    assert old and all(h.page_start is None and h.page_end is None for h in old)


@pytest.mark.db
def test_orchestrated_steps_carry_the_layout(tmp_path, registry_config, embedder, shared_data, registry):
    from pipeline import steps

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shared_data / SAMPLES / "006-pdflatex-outline/pdflatex-outline.pdf", src / "o.pdf")
    cfg = IndexConfig(index="docs", lock_timeout=2)
    factory = lambda c: embedder  # noqa: E731
    planned = steps.plan(str(src), cfg, owner="airflow:test", embedder=factory, registry_config=registry_config)
    staged = steps.stage(planned["run_id"], cfg, embedder=factory, registry_config=registry_config)
    assert staged["chunks"] > 2
    in_process = chunk_document(scan_source(src).documents[0], embedder.token_counter(), embedder.max_tokens)
    rows = registry.member_rows("docs", registry.get_version(staged["version"]).version_seq)
    assert sorted((r.chunk_id, r.page_start, tuple(r.heading_path)) for r in rows) == sorted(
        (c.chunk_id, c.pages.start, c.heading_path) for c in in_process)


# -- end to end: the CLI -----------------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.slow
def test_index_a_folder_of_formats_then_search_with_pages(tmp_path, database_url, shared_data):
    src = tmp_path / "src"
    src.mkdir()
    for name, target in [("004-pdflatex-4-pages/pdflatex-4-pages.pdf", "report.pdf"),
                         ("005-libreoffice-writer-password/libreoffice-writer-password.pdf", "locked.pdf"),
                         ("007-imagemagick-images/imagemagick-images.pdf", "scan.pdf")]:
        shutil.copy(shared_data / SAMPLES / name, src / target)
    (src / "broken.pdf").write_bytes(sample(shared_data, "004-pdflatex-4-pages/pdflatex-4-pages.pdf")[:12000])
    (src / "quarterly.docx").write_bytes(make_docx(long_report_docx))
    (src / "install.html").write_bytes(PAGE)
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(tmp_path / "home"))

    def ragpipe(*args):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    summary = json.loads(ragpipe("index", str(src), "--json"))
    assert summary["status"] == "succeeded" and summary["documents"]["new"] == 3
    skipped = {s["doc_id"]: s["reason"] for s in summary["skipped"]}
    assert skipped["locked.pdf"] == "encrypted PDF: it needs a password to be read"
    assert skipped["scan.pdf"].startswith("no text layer (scanned or image-only PDF")
    assert skipped["broken.pdf"].startswith("damaged PDF: ")
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        recorded = reg.get_run(summary["run_id"]).skipped
    assert {s["doc_id"]: s["reason"] for s in recorded} == skipped

    hits = json.loads(ragpipe("search", "Hello, here is some text without a meaning", "--k", "10", "--json"))
    report = [h for h in hits if h["doc_id"] == "report.pdf"]
    assert report and all(1 <= h["page_start"] <= h["page_end"] <= 4 for h in report)
    assert all(h["page_start"] is None for h in hits if h["doc_id"] != "report.pdf")
    docx_hits = json.loads(ragpipe("search", "supply figures of the northern region", "--json"))
    assert any(h["doc_id"] == "quarterly.docx" and h["heading_path"] == ["Risks", "Risks by region"] for h in docx_hits)
    html_hits = json.loads(ragpipe("search", "proxy variable", "--json"))
    assert any(h["doc_id"] == "install.html" and h["heading_path"] == ["Installing"] for h in html_hits)
    human = ragpipe("search", "Hello, here is some text without a meaning", "--k", "3")
    assert "report.pdf" in human and ("p. " in human or "pp. " in human)

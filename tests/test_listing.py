"""The object-store read plan (pure): what is read again, what is left unread, what is skipped again."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from pipeline.sources.base import SkippedDocument, SourceDocument
from pipeline.sources.filters import SourceFilter
from pipeline.sources.listing import ListedObject, ListingUpdate, fingerprint, plan_reads, record_of
from registry.store import DocumentState

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
CHUNKER = "chunker-v1"


def obj(doc_id: str, etag: str = '"e1"', size: int = 10, mtime: datetime = T0) -> ListedObject:
    return ListedObject(doc_id, f"b/p/{doc_id}", f"s3://b/p/{doc_id}", size, etag, mtime)


def indexed(doc_id: str, content_hash: str = "h1", status: str = "active") -> DocumentState:
    return DocumentState(doc_id, content_hash, "m", "c", status, 1)


def doc(doc_id: str, content_hash: str = "h1") -> SourceDocument:
    return SourceDocument(doc_id, "text", f"s3://b/p/{doc_id}", "markdown", content_hash=content_hash)


def test_an_object_listed_as_recorded_is_not_read():
    listed = [obj("a.md")]
    recorded = {"a.md": record_of(listed[0], CHUNKER, doc("a.md"))}
    plan = plan_reads(listed, recorded, {"a.md": indexed("a.md")}, CHUNKER)
    assert (plan.read, plan.unread, plan.skipped) == ([], ["a.md"], [])


def test_any_change_of_etag_size_or_mtime_reads_the_object_again():
    recorded = {"a.md": record_of(obj("a.md"), CHUNKER, doc("a.md"))}
    known = {"a.md": indexed("a.md")}
    for changed in (obj("a.md", etag='"e2"'), obj("a.md", size=11), obj("a.md", mtime=T0.replace(minute=1))):
        assert plan_reads([changed], recorded, known, CHUNKER).read == [changed]


def test_another_chunker_or_extractor_reads_again():
    recorded = {"a.md": record_of(obj("a.md"), CHUNKER, doc("a.md")),
                "r.pdf": record_of(obj("r.pdf"), CHUNKER, doc("r.pdf"))}
    known = {"a.md": indexed("a.md"), "r.pdf": indexed("r.pdf")}
    assert [o.doc_id for o in plan_reads([obj("a.md"), obj("r.pdf")], recorded, known, "chunker-v2").read] == [
        "a.md", "r.pdf"]
    # the PDF recorded under another extractor version: only it is read again
    stale = {**recorded, "r.pdf": replace(recorded["r.pdf"], fingerprint=CHUNKER + ";extractor=pdfium-0")}
    assert fingerprint(CHUNKER, "r.pdf").startswith(CHUNKER + ";extractor=")  # a PDF's extractor is part of it
    assert [o.doc_id for o in plan_reads([obj("a.md"), obj("r.pdf")], stale, known, CHUNKER).read] == ["r.pdf"]


def test_a_document_the_index_no_longer_holds_as_read_is_read_again():
    recorded = {"a.md": record_of(obj("a.md"), CHUNKER, doc("a.md"))}
    for known in ({}, {"a.md": indexed("a.md", status="deleted")}, {"a.md": indexed("a.md", content_hash="h0")}):
        assert [o.doc_id for o in plan_reads([obj("a.md")], recorded, known, CHUNKER).read] == ["a.md"]


def test_a_recorded_skip_is_repeated_without_reading():
    skip = SkippedDocument("bad.pdf", "encrypted PDF: it needs a password to be read")
    recorded = {"bad.pdf": record_of(obj("bad.pdf"), CHUNKER, skip)}
    plan = plan_reads([obj("bad.pdf")], recorded, {}, CHUNKER)
    assert plan.read == [] and plan.skipped == [skip]
    empty = SkippedDocument("e.md", "empty document", gone=True)
    again = plan_reads([obj("e.md")], {"e.md": record_of(obj("e.md"), CHUNKER, empty)}, {}, CHUNKER).skipped
    assert again == [empty]  # still gone: its document stays deleted


def test_listing_update_round_trips_through_json():
    update = ListingUpdate("s3://b/p/", [record_of(obj("a.md"), CHUNKER, doc("a.md")),
                                         record_of(obj("x.md", etag=None, mtime=None), CHUNKER,
                                                   SkippedDocument("x.md", "empty document", gone=True))], ["gone.md"])
    assert ListingUpdate.from_json(update.to_json()) == update


def test_the_filter_prunes_excluded_directories_of_flat_keys():
    selection = SourceFilter()
    assert selection.selects("docs/guide.md") and selection.selects("src/app.js")
    assert not selection.selects(".git/notes.md")  # a hidden directory
    assert not selection.selects("a/.cache/x.md")
    assert not selection.selects("node_modules/pkg/readme.md") and not selection.selects("web/node_modules/x.js")
    assert not selection.selects("image.png")  # not included
    assert selection.too_large("big.md", selection.max_bytes + 1).reason.startswith("larger than the ")


def test_store_errors_name_the_uri_say_why_and_redact_credentials():
    from pipeline.errors import SourceUnreachable
    from pipeline.sources.credentials import ObjectStoreCredentials
    from pipeline.sources.objectstore import _Store

    creds = ObjectStoreCredentials(access_key="AKIAEXAMPLE", secret_key="s3cr3t", session_token="tok3n")
    store = _Store("file", "", "/srv/docs/", creds, "file:///srv/docs/")
    denied = store._error("cannot be listed", PermissionError("AccessDenied for AKIAEXAMPLE with s3cr3t / tok3n"))
    assert str(denied).startswith("source file:///srv/docs/: access denied") and not denied.transient
    missing = store._error("cannot be listed", FileNotFoundError("NoSuchBucket"))
    assert str(missing).startswith("source file:///srv/docs/ does not exist") and not missing.transient
    down = store._error("cannot be listed", OSError("connection reset, key AKIAEXAMPLE"))
    assert isinstance(down, SourceUnreachable) and down.transient
    for err in (denied, missing, down):
        assert not any(s in str(err) for s in ("AKIAEXAMPLE", "s3cr3t", "tok3n"))

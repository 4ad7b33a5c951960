"""Object-store sources against a real S3 API (moto's server): only objects whose listing changed are
read, deletes and edits follow the store exactly, every format the directory source reads is read
the same way, and credentials appear in no message, log or registry row."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from conftest import write_tree
from pipeline.chunking import chunk_document
from pipeline.cli import EXIT_TERMINAL, main
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, SourceUnavailable, SourceUnreachable
from pipeline.runner import run_index
from pipeline.sources import ObjectStoreCredentials, scan_source
from s3server import free_port, request_log, s3_client

pytestmark = pytest.mark.db

SECRET = "sEcReT-" + uuid.uuid4().hex  # a secret no message may show
KEY_ID = "AKIATESTKEY" + uuid.uuid4().hex[:8].upper()
SAMPLES = "pdf-samples"


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A client of the server; the standard AWS variables point ragpipe at it with a secret to guard."""
    return s3_client(s3_endpoint, monkeypatch, KEY_ID, SECRET)


@pytest.fixture
def bucket(s3) -> str:
    name = f"docs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def put(s3, bucket: str, files: dict[str, str | bytes], prefix: str = "docs/") -> None:
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body.encode() if isinstance(body, str) else body)


CORPUS = {
    "guide.md": "# Guide\n\nRagpipe keeps a retrieval index in step with its sources.\n\n## Usage\n\nRun it hourly.\n",
    "notes/wings.txt": "Swept wings flutter at transonic speed; the tunnel shows it.\n",
    "page.html": "<html><head><title>Heat</title></head><body><h1>Heat</h1><p>Boundary layers heat up.</p></body></html>",
}


def index(source, registry, embedder, name="docs", **kw):
    config = IndexConfig(index=name, lock_timeout=5, **kw)
    return run_index(source, registry, embedder, config), config


def fresh_chunk_ids(source, embedder, config):
    """The chunk ids a full build of the source's current state holds (every object read)."""
    scan = scan_source(source, include=config.include, exclude=config.exclude, max_bytes=config.max_document_bytes)
    counter = embedder.token_counter()
    return {c.chunk_id for d in scan.documents for c in chunk_document(d, counter, embedder.max_tokens)}


def test_first_run_records_listing_and_a_run_with_nothing_changed_reads_no_object(s3, bucket, registry, embedder):
    put(s3, bucket, CORPUS)
    source = f"s3://{bucket}/docs/"
    with request_log() as log:
        first, config = index(source, registry, embedder)
    assert first.status == "succeeded" and first.documents["new"] == 3
    assert sorted(set(log.object_reads(bucket))) == sorted("docs/" + k for k in CORPUS)
    assert registry.active_chunk_ids("docs") == fresh_chunk_ids(source, embedder, config)
    recorded = registry.source_objects("docs", source)
    assert set(recorded) == set(CORPUS)
    listed = {o["Key"][len("docs/"):]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix="docs/")["Contents"]}
    for doc_id, row in recorded.items():
        assert row.etag == listed[doc_id]["ETag"] and row.size == listed[doc_id]["Size"]
        assert row.mtime == listed[doc_id]["LastModified"] and row.content_hash
    sources = {r[0] for r in registry.conn.execute("SELECT source_uri FROM documents WHERE index_name = 'docs'")}
    assert f"s3://{bucket}/docs/notes/wings.txt" in sources

    with request_log() as log:
        second, _ = index(source, registry, embedder)
    assert log.object_reads(bucket) == []  # the listing alone showed nothing changed
    assert any("list-type" in query for _, _, query in log.requests)
    assert second.status == "succeeded" and second.version is None
    assert second.documents["unchanged"] == 3 and second.documents["seen"] == 3


def test_edit_delete_and_add_one_object_each(s3, bucket, registry, embedder):
    put(s3, bucket, CORPUS)
    source = f"s3://{bucket}/docs/"
    first, config = index(source, registry, embedder)
    put(s3, bucket, {"guide.md": CORPUS["guide.md"].replace("hourly", "every night"), "new.md": "# New\n\nFresh.\n"})
    s3.delete_object(Bucket=bucket, Key="docs/notes/wings.txt")
    with request_log() as log:
        second, _ = index(source, registry, embedder)
    assert sorted(set(log.object_reads(bucket))) == ["docs/guide.md", "docs/new.md"]
    d = second.documents
    assert (d["new"], d["changed"], d["deleted"], d["unchanged"]) == (1, 1, 1, 1)
    assert registry.active_chunk_ids("docs") == fresh_chunk_ids(source, embedder, config)  # fresh equals incremental
    states = registry.document_states("docs")
    assert states["notes/wings.txt"].status == "deleted"  # as a deleted file's document is
    assert set(registry.source_objects("docs", source)) == {"guide.md", "page.html", "new.md"}

    with request_log() as log:
        third, _ = index(source, registry, embedder)
    assert log.object_reads(bucket) == [] and third.version is None


def test_a_new_etag_over_the_same_content_rechunks_nothing(s3, bucket, registry, embedder):
    put(s3, bucket, CORPUS)
    source = f"s3://{bucket}/docs/"
    index(source, registry, embedder)
    before = registry.source_objects("docs", source)["guide.md"]
    # a multipart upload of the same bytes: another ETag ("...-1"), the same content
    upload = s3.create_multipart_upload(Bucket=bucket, Key="docs/guide.md")
    part = s3.upload_part(Bucket=bucket, Key="docs/guide.md", UploadId=upload["UploadId"], PartNumber=1,
                          Body=CORPUS["guide.md"].encode())
    s3.complete_multipart_upload(Bucket=bucket, Key="docs/guide.md", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    with request_log() as log:
        second, _ = index(source, registry, embedder)
    assert set(log.object_reads(bucket)) == {"docs/guide.md"}
    assert second.documents["unchanged"] == 3 and second.version is None  # nothing re-chunked, no version
    after = registry.source_objects("docs", source)["guide.md"]
    assert after.etag != before.etag and after.etag.endswith('-1"') and after.content_hash == before.content_hash
    with request_log() as log:
        index(source, registry, embedder)
    assert log.object_reads(bucket) == []  # the new ETag was recorded


def test_pdfs_read_from_s3_as_from_a_directory(s3, bucket, registry, embedder, shared_data, tmp_path):
    samples = {"report.pdf": "004-pdflatex-4-pages/pdflatex-4-pages.pdf",
               "outline.pdf": "006-pdflatex-outline/pdflatex-outline.pdf",
               "locked.pdf": "005-libreoffice-writer-password/libreoffice-writer-password.pdf"}
    local = tmp_path / "local"
    for name, rel in samples.items():
        local.mkdir(exist_ok=True)
        shutil.copy(shared_data / SAMPLES / rel, local / name)
    put(s3, bucket, {name: (local / name).read_bytes() for name in samples}, prefix="pdfs/")
    source = f"s3://{bucket}/pdfs/"

    from_s3, from_dir = scan_source(source), scan_source(local)
    key = lambda d: (d.doc_id, d.content_hash, d.extraction, d.format, json.dumps(d.metadata, sort_keys=True))  # noqa: E731
    assert [key(d) for d in from_s3.documents] == [key(d) for d in from_dir.documents]
    assert {d.doc_id for d in from_s3.documents} == {"report.pdf", "outline.pdf"}
    assert [(s.doc_id, s.reason) for s in from_s3.skipped] == [(s.doc_id, s.reason) for s in from_dir.skipped]
    assert from_s3.skipped[0].reason == "encrypted PDF: it needs a password to be read"

    first, _ = index(source, registry, embedder)
    assert first.documents["new"] == 2 and first.skipped == [{"doc_id": "locked.pdf", "reason": from_s3.skipped[0].reason}]
    pages = registry.conn.execute("SELECT max(page_end) FROM chunks WHERE index_name = 'docs' AND doc_id = 'report.pdf'"
                                  ).fetchone()[0]
    assert pages == 4  # page attribution survives the trip through the store
    with request_log() as log:
        second, _ = index(source, registry, embedder)
    assert log.object_reads(bucket) == []  # the unreadable PDF is not fetched again either...
    assert second.skipped == first.skipped  # ...and still reported


def test_globs_and_size_limit_select_objects_as_files(s3, bucket, registry, embedder, tmp_path):
    files = {"keep.md": "# Keep\n\nKept.\n", "big.md": "# Big\n\n" + "word " * 100, ".hidden/x.md": "# Hidden\n",
             "node_modules/pkg/index.js": "export const x = 1;\n", "a/node_modules/y.js": "let y = 2;\n",
             "src/app.js": "export function app() { return 1; }\n", "image.png": b"\x89PNG\r\n\x1a\n\x00\x00",
             "notes.txt": "Plain notes.\n"}
    put(s3, bucket, files)
    local = write_tree(tmp_path / "local", files)
    for kw in ({"max_bytes": 100}, {"max_bytes": 100, "include": ("*.md", "*.png"), "exclude": ("big*",)}):
        s3_scan, dir_scan = scan_source(f"s3://{bucket}/docs", **kw), scan_source(local, **kw)
        assert [d.doc_id for d in s3_scan.documents] == [d.doc_id for d in dir_scan.documents]
        assert [(s.doc_id, s.reason) for s in s3_scan.skipped] == [(s.doc_id, s.reason) for s in dir_scan.skipped]
    assert [d.doc_id for d in scan_source(f"s3://{bucket}/docs", max_bytes=100).documents] == [
        "keep.md", "notes.txt", "src/app.js"]
    assert [s.doc_id for s in scan_source(f"s3://{bucket}/docs", max_bytes=100).skipped] == ["big.md"]
    with request_log() as log:
        summary, _ = index(f"s3://{bucket}/docs/", registry, embedder, max_document_bytes=100)
    size = len(files["big.md"].encode())
    assert summary.skipped == [{"doc_id": "big.md", "reason": f"larger than the 100-byte limit ({size} bytes)"}]
    assert "docs/big.md" not in log.object_reads(bucket)  # the size came from the listing
    assert not any("node_modules" in k or ".hidden" in k for k in log.object_reads(bucket))


def test_a_missing_bucket_fails_naming_the_uri_without_credentials_and_leaves_the_index(
    s3, bucket, registry, embedder, registry_config, capsys, caplog
):
    put(s3, bucket, CORPUS)
    first, config = index(f"s3://{bucket}/docs/", registry, embedder)
    live = {a.alias: a.version for a in registry.list_aliases()}
    missing = f"s3://no-such-{uuid.uuid4().hex[:10]}/docs/"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceUnavailable) as err:
        index(missing, registry, embedder)
    message = str(err.value)
    assert message.startswith(f"source {missing} does not exist") and "nothing was changed" in message
    assert not isinstance(err.value, SourceUnreachable)  # terminal: retrying does not create the bucket
    assert {a.alias: a.version for a in registry.list_aliases()} == live
    assert registry.document_states("docs")["guide.md"].status == "active"
    run = registry.list_runs("docs", limit=1)[0]
    assert run.status == "failed" and missing in run.error

    argv = ["index", missing, "--index", "docs", "--database-url", registry_config.database_url,
            "--home", str(registry_config.home)]
    assert main(argv) == EXIT_TERMINAL
    err_text = capsys.readouterr().err
    assert missing in err_text and "does not exist" in err_text

    # the secret is nowhere: not in the message, the log, the CLI's output, nor any registry row
    dump = json.dumps([list(r) for table in ("runs", "source_objects", "documents")
                       for r in registry.conn.execute(f"SELECT * FROM {table}")], default=str)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("pipeline", "registry"))
    for text in (message, ours, err_text, dump, repr(ObjectStoreCredentials.from_env())):
        assert SECRET not in text and KEY_ID not in text


def test_an_unreachable_store_is_transient_and_its_error_holds_no_secret(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    port = free_port()  # nothing listens there
    creds = ObjectStoreCredentials(access_key=KEY_ID, secret_key=SECRET, endpoint_url=f"http://127.0.0.1:{port}",
                                   region="us-east-1")
    with pytest.raises(SourceUnreachable) as err:
        scan_source("s3://somewhere/docs/", credentials=creds)
    assert "s3://somewhere/docs/" in str(err.value) and err.value.transient
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained error to leak through
    assert SECRET not in repr(creds)


def test_credentials_in_the_uri_are_refused_without_echoing_or_recording_them(registry, embedder):
    uri = f"s3://{KEY_ID}:{SECRET}@bucket/docs/"
    with pytest.raises(ConfigError) as err:
        scan_source(uri)
    assert "s3://bucket/docs/" in str(err.value) and SECRET not in str(err.value) and KEY_ID not in str(err.value)
    with pytest.raises(ConfigError):
        index(uri, registry, embedder)
    runs = json.dumps([list(r) for r in registry.conn.execute("SELECT * FROM runs")], default=str)
    assert SECRET not in runs and KEY_ID not in runs  # refused before the run was recorded


def test_file_uri_source_reads_only_what_changed(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha.\n", "b.md": "# B\n\nBeta.\n"})
    source = root.as_uri() + "/"
    first, _ = index(source, registry, embedder)
    assert first.documents["new"] == 2
    rows = registry.source_objects("docs", source)
    assert set(rows) == {"a.md", "b.md"} and rows["a.md"].etag is None and rows["a.md"].mtime is not None
    (root / "b.md").write_text("# B\n\nBeta, edited.\n")
    (root / "c.md").write_text("# C\n\nGamma.\n")
    (root / "a.md").unlink()
    second, _ = index(source, registry, embedder)
    d = second.documents
    assert (d["new"], d["changed"], d["deleted"], d["unchanged"]) == (1, 1, 1, 0)
    scan = scan_source(source, memory=_memory(registry, embedder))
    assert scan.unread == ["b.md", "c.md"] and scan.documents == []


def _memory(registry, embedder):
    from pipeline.chunking import chunker_version
    from pipeline.embedding import prefixes_of
    from pipeline.sources import ListingMemory

    return ListingMemory(lambda uri: registry.source_objects("docs", uri), registry.document_states("docs"),
                         chunker_version(embedder.model_id, embedder.max_tokens, prefixes_of(embedder).passage))

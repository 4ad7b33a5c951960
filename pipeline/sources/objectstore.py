"""Discovery from object storage (``s3://``, ``gs://``, ``file://``): list, read what changed, make documents.

Reads go through ``pyarrow.fs``. An S3 listing goes through fsspec's ``s3fs``, because pyarrow's
file infos carry no ETag; other stores are listed by pyarrow (size and modification time only).
Objects are selected by the same filter as a directory's files, and their bytes become documents
through the same extraction path (:func:`pipeline.sources.documents.document_from_bytes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

from pipeline.errors import ConfigError, SourceUnavailable, SourceUnreachable
from pipeline.formats.isolation import ExtractLimits, IsolatedExtractor
from pipeline.sources.base import SkippedDocument, SourceDocument, SourceScan
from pipeline.sources.credentials import ObjectStoreCredentials
from pipeline.sources.documents import document_from_bytes
from pipeline.sources.filters import SourceFilter
from pipeline.sources.listing import ListedObject, ListingMemory, ListingUpdate, plan_reads, planned_scan, record_of


SCHEMES = ("s3", "gs", "gcs", "file")
FETCH_THREADS = 8
FETCH_WINDOW = 32


def is_object_store_uri(source: str) -> bool:
    """Whether ``source`` names an object store (``s3://``, ``gs://``, ``gcs://``, ``file://``)."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def source_root(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of a source URI; the prefix is a directory (empty or ending in '/').

    Raises:
        ConfigError: the URI holds credentials, or names no bucket.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise ConfigError(f"source {scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}: credentials in the "
                          f"URI are refused; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a connection")
    if scheme == "file":
        path = os.path.abspath(parts.path or "/")
        return scheme, "", path.rstrip("/") + "/"
    if not parts.netloc:
        raise ConfigError(f"source {uri}: no bucket named")
    prefix = parts.path.lstrip("/")
    return scheme, parts.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def root_uri(scheme: str, bucket: str, prefix: str) -> str:
    """The source's URI as recorded (runs, the registry's listing): normalized, without credentials."""
    return f"file://{quote(prefix)}" if scheme == "file" else f"{scheme}://{bucket}/{quote(prefix)}"


def scan_object_store(
    uri: str, selection: SourceFilter, limits: ExtractLimits, memory: ListingMemory | None = None,
    credentials: ObjectStoreCredentials | None = None,
) -> SourceScan:
    """Read the selected objects under ``uri`` whose listing changed since ``memory`` recorded it.

    Raises:
        SourceUnavailable: the bucket or prefix does not exist, or access is denied (terminal).
        SourceUnreachable: the store did not answer (transient).
        ConfigError: the URI holds credentials.
    """
    scheme, bucket, prefix = source_root(uri)
    credentials = credentials or ObjectStoreCredentials.from_env()
    label = root_uri(scheme, bucket, prefix)
    store = _Store(scheme, bucket, prefix, credentials, label)
    listed: list[ListedObject] = []
    objects = store.list()
    skipped = list(store.skipped)
    for obj in objects:
        if obj.doc_id.endswith("/"):
            continue  # a "directory" marker
        if not selection.selects(obj.doc_id):
            continue
        problem = _bad_key(obj.doc_id)
        too_large = selection.too_large(obj.doc_id, obj.size)
        if problem or too_large:
            skipped.append(SkippedDocument(obj.doc_id, problem) if problem else too_large)  # type: ignore[arg-type]
            continue
        listed.append(obj)
    chunker = memory.chunker_version if memory else ""
    recorded = memory.recorded(label) if memory else {}
    plan = plan_reads(listed, recorded, memory.known if memory else {}, chunker)
    documents: list[SourceDocument] = []
    update = ListingUpdate(source=label, forget=sorted(set(recorded) - {o.doc_id for o in listed}))
    with IsolatedExtractor(limits) as extractor:  # its worker starts with the first PDF, DOCX or HTML object
        for obj, data in _fetched(store, plan.read):
            if isinstance(data, SkippedDocument):  # not read: nothing to remember, the next run tries again
                skipped.append(data)
                continue
            result = document_from_bytes(obj.doc_id, data, obj.uri, extractor)
            (documents if isinstance(result, SourceDocument) else skipped).append(result)  # type: ignore[arg-type]
            if memory is not None:
                update.record.append(record_of(obj, chunker, result))
    return planned_scan(label, "objects", len(listed), plan, documents, skipped, update if memory is not None else None)


def _fetched(store: "_Store", objects: list[ListedObject]) -> Iterator[tuple[ListedObject, bytes | SkippedDocument]]:
    """Each object with its bytes, in order, fetched ``FETCH_THREADS`` at a time (requests wait on the
    network, not the CPU); at most ``FETCH_WINDOW`` objects' bytes are held at once."""
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for start in range(0, len(objects), FETCH_WINDOW):
            part = objects[start:start + FETCH_WINDOW]
            yield from zip(part, pool.map(store.read, part))


def _bad_key(doc_id: str) -> str | None:
    """Why a key cannot be a doc_id: an empty, '.' or '..' segment would name a path outside the prefix."""
    if any(part in ("", ".", "..") for part in doc_id.split("/")):
        return "object key has an empty, '.' or '..' path segment"
    return None


class _Store:
    """One source's filesystem: listing and reading, with errors named by the URI and redacted."""

    def __init__(self, scheme: str, bucket: str, prefix: str, credentials: ObjectStoreCredentials, label: str):
        self.scheme, self.bucket, self.prefix, self.label = scheme, bucket, prefix, label
        self.credentials = credentials
        self.skipped: list[SkippedDocument] = []  # what the listing found but may not read
        self.root = prefix if scheme == "file" else f"{bucket}/{prefix}"
        try:
            self.fs = self._filesystem()
        except Exception as exc:  # noqa: BLE001 - any failure to configure the client names the source
            raise self._error("cannot be opened", exc) from None

    def _filesystem(self) -> Any:
        from pyarrow import fs as pafs

        if self.scheme == "s3":
            c = self.credentials
            options: dict[str, Any] = {"access_key": c.access_key, "secret_key": c.secret_key,
                                       "session_token": c.session_token, "region": c.region}
            if c.endpoint_url:
                endpoint = urlsplit(c.endpoint_url)
                options.update(endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https")
                options["region"] = c.region or "us-east-1"
            return pafs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})
        if self.scheme == "file":
            return pafs.LocalFileSystem()
        filesystem, _ = pafs.FileSystem.from_uri(f"{self.scheme}://{self.bucket}/{self.prefix}")
        return filesystem

    def _error(self, what: str, exc: BaseException) -> SourceUnavailable:
        detail = self.credentials.redact(" ".join(str(exc).split()))[:300]
        if isinstance(exc, FileNotFoundError):
            return SourceUnavailable(f"source {self.label} does not exist ({detail}); nothing was changed")
        if isinstance(exc, PermissionError) or "AccessDenied" in detail or "Forbidden" in detail:
            return SourceUnavailable(f"source {self.label}: access denied ({detail}); nothing was changed")
        return SourceUnreachable(f"source {self.label} {what} ({type(exc).__name__}: {detail}); nothing was "
                                 f"changed; retry later")

    def list(self) -> list[ListedObject]:
        """Every object under the prefix (the whole listing first: a failure changes nothing)."""
        try:
            return list(self._list_s3() if self.scheme == "s3" else self._list_pyarrow())
        except SourceUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore and pyarrow raise many kinds; all name the source
            raise self._error("cannot be listed", exc) from None

    def _object(self, path: str, size: int, etag: str | None, mtime: datetime | None) -> ListedObject:
        rel = path[len(self.root):]
        uri = f"file://{quote(path)}" if self.scheme == "file" else f"{self.scheme}://{quote(path)}"
        if mtime is not None:
            mtime = mtime.astimezone(timezone.utc)
        return ListedObject(doc_id=rel, path=path, uri=uri, size=size, etag=etag, mtime=mtime)

    def _list_s3(self) -> Iterator[ListedObject]:
        from registry.extras import require

        s3fs = require("s3fs", "pipeline", "listing an s3:// source")
        c = self.credentials
        client_kwargs = {"region_name": c.region} if c.region else {}
        fs = s3fs.S3FileSystem(key=c.access_key, secret=c.secret_key, token=c.session_token,
                               endpoint_url=c.endpoint_url, client_kwargs=client_kwargs,
                               skip_instance_cache=True, use_listings_cache=False)
        for path, info in sorted(fs.find(self.root, detail=True).items()):
            if info.get("type") == "file":
                yield self._object(path, int(info["size"]), info.get("ETag"), info.get("LastModified"))

    def _list_pyarrow(self) -> Iterator[ListedObject]:
        from pyarrow import fs as pafs

        root = self.root.rstrip("/") or "/"
        base = self.fs.get_file_info(root)
        if base.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{root} does not exist")
        local = isinstance(self.fs, pafs.LocalFileSystem)
        real_root = os.path.realpath(root)
        for info in sorted(self.fs.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                continue
            if local and not os.path.realpath(info.path).startswith(real_root + os.sep):
                self.skipped.append(SkippedDocument(info.path[len(self.root):], "symlink leaves the source root"))
                continue
            yield self._object(info.path, int(info.size), None, info.mtime)

    def read(self, obj: ListedObject) -> bytes | SkippedDocument:
        """The object's bytes, or why they could not be read this run (the document stays as indexed)."""
        try:
            with self.fs.open_input_stream(obj.path) as stream:
                data = stream.read(obj.size + 1)
        except FileNotFoundError:
            return SkippedDocument(obj.doc_id, "deleted while being read; the next run will pick it up")
        except Exception as exc:  # noqa: BLE001 - one object's failure skips it, with why
            detail = self.credentials.redact(" ".join(str(exc).split()))[:200]
            return SkippedDocument(obj.doc_id, f"unreadable: {detail}")
        if len(data) != obj.size:
            return SkippedDocument(obj.doc_id, "changed while being read; the next run will pick it up")
        return bytes(data)

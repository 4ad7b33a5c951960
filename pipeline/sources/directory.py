"""Discovery from a directory tree: walk it under the source filter, read each file, make documents.

Symlinks may not leave the root; a directory that cannot be listed keeps what was indexed from it.
With the registry's memory of the last listing, a file whose status (inode, size, modification and
change times) is as recorded is not read: its indexed document stands (``pipeline.sources.listing``).
A file changed within ``RACY_SECONDS`` of the scan is remembered as unknown and read again next time,
since a write in the same clock tick would leave its status unchanged.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote_from_bytes

from pipeline.formats.isolation import ExtractLimits, IsolatedExtractor
from pipeline.sources.base import SkippedDocument, SourceDocument, SourceScan, storable
from pipeline.sources.documents import document_from_bytes
from pipeline.sources.filters import SourceFilter
from pipeline.sources.listing import ListedObject, ListingMemory, ListingUpdate, plan_reads, planned_scan, record_of

RACY_SECONDS = 2.0
RACY = "racy"  # the recorded status of a file changed just before the scan: never equal to a real one


def scan_directory(root: Path, selection: SourceFilter, limits: ExtractLimits,
                   memory: ListingMemory | None = None) -> SourceScan:
    """Read the selected files under ``root`` (resolved) whose status changed since ``memory``
    recorded it (every file without it); PDF, DOCX and HTML files are extracted in a worker process
    under ``limits``."""
    skipped: list[SkippedDocument] = []
    started_ns = time.time_ns()
    label = root.as_uri()
    uri_prefix = label.rstrip("/") + "/"
    listed = [listed for rel, entry in _walk(root, selection, skipped)
              if (listed := _listed(uri_prefix, rel, entry, selection, skipped)) is not None]
    chunker = memory.chunker_version if memory else ""
    recorded = memory.recorded(label) if memory else {}
    plan = plan_reads(listed, recorded, memory.known if memory else {}, chunker)
    update = ListingUpdate(source=label, forget=sorted(set(recorded) - {f.doc_id for f in listed}))
    racy_after_ns = started_ns - int(RACY_SECONDS * 1e9)
    documents: list[SourceDocument] = []
    with IsolatedExtractor(limits) as extractor:  # its worker starts with the first PDF, DOCX or HTML file
        for item in plan.read:
            result = _read_file(item, extractor)
            (documents if isinstance(result, SourceDocument) else skipped).append(result)  # type: ignore[arg-type]
            if memory is not None and not _unreadable(result) and storable(item.doc_id) == item.doc_id:
                row = record_of(item, chunker, result)
                update.record.append(row if _settled(item, racy_after_ns) else replace(row, etag=RACY))
    return planned_scan(label, "files", len(listed), plan, documents, skipped, update if memory is not None else None)


def _listed(uri_prefix: str, rel: str, entry: os.DirEntry[str], selection: SourceFilter,
            skipped: list[SkippedDocument]) -> ListedObject | None:
    """The file as a listing entry, its status in the etag; None (and a skip) when it cannot be
    stat'ed or is over the size limit."""
    try:
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        skipped.append(SkippedDocument(rel, f"unreadable: {exc.strerror}"))
        return None
    too_large = selection.too_large(rel, st.st_size)
    if too_large:
        skipped.append(too_large)
        return None
    return ListedObject(doc_id=rel, path=entry.path, uri=uri_prefix + quote_from_bytes(os.fsencode(rel)),
                        size=st.st_size, etag=f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}",
                        mtime=datetime.fromtimestamp(st.st_mtime_ns / 1e9, timezone.utc))


def _settled(item: ListedObject, racy_after_ns: int) -> bool:
    """Whether the file last changed well before the scan began (its status then identifies its content)."""
    assert item.etag is not None
    mtime_ns, ctime_ns = (int(part) for part in item.etag.rsplit(":", 2)[1:])
    return max(mtime_ns, ctime_ns) < racy_after_ns


def _unreadable(result: SourceDocument | SkippedDocument) -> bool:
    """A read that failed (not the file's content refused): nothing to remember, the next run tries
    again. (Nor is a file whose name PostgreSQL cannot store remembered: it is refused each run.)"""
    return isinstance(result, SkippedDocument) and result.reason.startswith(("unreadable", "changed while"))


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root + os.sep)


def _walk(root: Path, selection: SourceFilter, skipped: list[SkippedDocument]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield (relative posix path, entry) for the wanted files under root; symlinks may not leave it.

    A directory that cannot be listed is skipped as a whole with ``under`` set, so that the
    documents indexed from it are kept; a wanted name that is no regular file is skipped with why.
    """
    root_str = str(root)
    visited = {root_str}
    stack: list[tuple[str, str]] = [(root_str, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedDocument(prefix or ".", f"directory unreadable: {exc.strerror}", under=prefix))
            continue
        for entry in entries:
            rel = prefix + entry.name
            if selection.excluded(rel):
                continue
            try:
                is_link = entry.is_symlink()
                if is_link:
                    real = os.path.realpath(entry.path)
                    if not _inside(root_str, real):
                        skipped.append(SkippedDocument(rel, "symlink leaves the source root"))
                        continue
                if entry.is_dir(follow_symlinks=True):
                    real = os.path.realpath(entry.path) if is_link else entry.path
                    if real in visited:
                        continue  # a link back into the tree; already walked
                    visited.add(real)
                    stack.append((entry.path, rel + "/"))
                elif selection.wanted(rel):
                    if entry.is_file(follow_symlinks=True):
                        yield rel, entry
                    else:
                        skipped.append(SkippedDocument(rel, _not_a_file(entry)))
            except OSError as exc:
                skipped.append(SkippedDocument(rel, f"unreadable: {exc.strerror}"))


def _not_a_file(entry: os.DirEntry[str]) -> str:
    """Why a wanted name is not read: a dangling symlink, or what kind of file it is."""
    try:
        mode = entry.stat(follow_symlinks=True).st_mode
    except FileNotFoundError:
        return "dangling symlink"
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return f"not a regular file ({next((k for test, k in kinds.items() if test(mode)), 'of another kind')})"


def _read_at_most(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a file swapped for a FIFO since the scan cannot block
    try:
        parts = []
        remaining = limit
        while remaining > 0:
            part = os.read(fd, remaining)
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def _read_file(item: ListedObject, extractor: IsolatedExtractor) -> SourceDocument | SkippedDocument:
    rel = item.doc_id
    try:
        data = _read_at_most(item.path, item.size + 1)  # sized by stat: no 10 MiB buffer for a 1 KiB file
    except OSError as exc:
        return SkippedDocument(rel, f"unreadable: {exc.strerror}")
    if len(data) > item.size:
        return SkippedDocument(rel, "changed while being read; the next run will pick it up")
    return document_from_bytes(rel, data, item.uri, extractor)

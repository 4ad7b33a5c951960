"""Discovery from a directory tree: walk it under the source filter, read each file, make documents.

Symlinks may not leave the root; a directory that cannot be listed keeps what was indexed from it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

from pipeline.formats.isolation import ExtractLimits, IsolatedExtractor
from pipeline.sources.base import SkippedDocument, SourceDocument, SourceScan
from pipeline.sources.documents import document_from_bytes
from pipeline.sources.filters import SourceFilter


def scan_directory(root: Path, selection: SourceFilter, limits: ExtractLimits) -> SourceScan:
    """Read every selected file under ``root`` (resolved); PDF, DOCX and HTML files are extracted in
    a worker process under ``limits``."""
    skipped: list[SkippedDocument] = []
    files = list(_walk(root, selection, skipped))
    uri_prefix = root.as_uri().rstrip("/") + "/"
    with IsolatedExtractor(limits) as extractor:  # its worker starts with the first PDF, DOCX or HTML file
        results = [_read_file(uri_prefix, rel, entry, selection, extractor) for rel, entry in files]
    documents = sorted((r for r in results if isinstance(r, SourceDocument)), key=lambda d: d.doc_id)
    skipped.extend(sorted((r for r in results if isinstance(r, SkippedDocument)), key=lambda d: d.doc_id))
    return SourceScan(source=root.as_uri(), documents=documents, skipped=skipped)


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


def _read_file(
    uri_prefix: str, rel: str, entry: os.DirEntry[str], selection: SourceFilter, extractor: IsolatedExtractor
) -> SourceDocument | SkippedDocument:
    try:
        size = entry.stat(follow_symlinks=True).st_size
        too_large = selection.too_large(rel, size)
        if too_large:
            return too_large
        data = _read_at_most(entry.path, size + 1)  # sized by stat: no 10 MiB buffer for a 1 KiB file
    except OSError as exc:
        return SkippedDocument(rel, f"unreadable: {exc.strerror}")
    if len(data) > size:
        return SkippedDocument(rel, "changed while being read; the next run will pick it up")
    return document_from_bytes(rel, data, uri_prefix + quote_from_bytes(os.fsencode(rel)), extractor)

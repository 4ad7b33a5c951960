"""Freshness without a snapshot: upsert a batch of documents, or delete doc_ids, as one published version.

Both are runs like any other (``pipeline.runner``), under the same index lock and registry
invariants: hash, diff, chunk, embed (cache misses only), one small segment plus deletion sets,
validate, publish. They differ from a snapshot run in one thing: the source lists only some
documents, so the index's other documents stay as they are (a snapshot run deletes what its
source no longer lists). A bad item — a malformed line, a duplicate or unknown doc_id, a document
over ``max_document_bytes`` — is reported with its reason; the good ones are published.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.config import IndexConfig
from pipeline.embedding import Embedder
from pipeline.errors import ConfigError
from pipeline.runner import RunOptions, RunSummary, run_index
from pipeline.sources import SourceScan
from pipeline.sources.jsonl import scan_jsonl, scan_jsonl_lines
from registry import Registry


@dataclass(frozen=True)
class BatchOutcome:
    """What an upsert or delete did: the run, and the items it rejected with their reasons."""

    summary: RunSummary

    @property
    def rejected(self) -> list[dict[str, str]]:
        return list(self.summary.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary.to_dict(), "rejected": self.rejected}


def read_batch(batch: str | Path | BinaryIO, max_bytes: int) -> SourceScan:
    """The documents of a JSONL batch: a file, ``-`` for standard input, or an open binary stream.

    Raises:
        SourceUnavailable: the file cannot be read.
    """
    if isinstance(batch, (str, Path)) and str(batch) != "-":
        path = Path(batch)
        if path.suffix != ".jsonl" and path.is_dir():
            raise ConfigError(f"upsert reads a JSONL batch, not a directory ({path}); index a directory with "
                              f"`ragpipe index`")
        return scan_jsonl(path, max_bytes)
    stream = sys.stdin.buffer if isinstance(batch, (str, Path)) else batch
    return scan_jsonl_lines(stream, "stdin", "stdin:", max_bytes)


def upsert_documents(batch: str | Path | BinaryIO | SourceScan, registry: Registry, embedder: Embedder,
                     config: IndexConfig, *, progress: bool = False) -> BatchOutcome:
    """Add or replace the batch's documents in ``config.index`` and publish the result.

    A document already indexed with the same text and metadata costs nothing (no version when
    nothing changed); one with the same chunk texts as any indexed before is not re-embedded.

    Raises:
        IndexLocked: another run held the index for ``config.lock_timeout`` seconds; nothing changed.
        VersionRejected: the new version failed validation; the alias did not move.
    """
    scan = batch if isinstance(batch, SourceScan) else read_batch(batch, config.max_document_bytes)
    summary = run_index(scan, registry, embedder, config, progress=progress, options=RunOptions(partial=True))
    return BatchOutcome(summary)


def delete_documents(doc_ids: Iterable[str], registry: Registry, embedder: Embedder,
                     config: IndexConfig) -> BatchOutcome:
    """Delete documents from ``config.index`` by doc_id and publish the result; an id the index does
    not hold (or listed twice) is reported, the others are deleted.

    Raises:
        IndexLocked: another run held the index for ``config.lock_timeout`` seconds; nothing changed.
    """
    ids = tuple(doc_ids)
    if not ids:
        raise ConfigError("name at least one doc_id to delete")
    scan = SourceScan(source=f"delete:{config.index}", documents=[], skipped=[])
    summary = run_index(scan, registry, embedder, config, options=RunOptions(partial=True, delete=ids))
    return BatchOutcome(summary)

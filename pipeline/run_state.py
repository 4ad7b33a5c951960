"""A run's state: what it was asked (options), what it decided and did (state, summary), and what its
stages share (the context: registry, artifact store, embedder, configuration).

The in-process runner keeps the state in memory; orchestrated runs (``pipeline.steps``) save it in
the run's registry row after each step and load it in the next, so it holds ids, hashes and counts,
never texts, chunks or vectors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import IndexConfig
from pipeline.embedding import Embedder
from pipeline.segments.storage import SegmentArtifacts
from pipeline.sources import SourceDocument
from registry import Registry
from retrieval.artifacts import ArtifactStore


@dataclass
class RunSummary:
    """What one run did; ``to_dict()`` is what ``ragpipe index --json`` prints."""

    run_id: int
    index: str
    source: str
    status: str = "running"
    version: str | None = None
    model_id: str = ""
    documents: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)
    embedding: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    full_build: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    alias: dict[str, Any] | None = None
    gc: dict[str, Any] = field(default_factory=dict)
    recovered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "index": self.index,
            "source": self.source,
            "status": self.status,
            "version": self.version,
            "model_id": self.model_id,
            "documents": self.documents,
            "chunks": self.chunks,
            "embedding": self.embedding,
            "skipped": self.skipped,
            "stage_seconds": self.stage_seconds,
            "error": self.error,
            "full_build": self.full_build,
            "metrics": self.metrics,
            "alias": self.alias,
            "gc": self.gc,
            "recovered": self.recovered,
        }


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices (flags of ``ragpipe index``), as opposed to the index's configuration.

    Attributes:
        full: rebuild the version from the registry instead of from the head version's segments.
        shadow: attach the version to the alias as its shadow instead of publishing it.
        partial: the source lists only some documents (an upsert): the index's other documents
            stay as they are, instead of being deleted as gone from a snapshot.
        delete: doc_ids to delete (with ``partial``: ``ragpipe delete``).
    """

    full: bool = False
    shadow: bool = False
    partial: bool = False
    delete: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"full": self.full, "shadow": self.shadow, "partial": self.partial, "delete": list(self.delete)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunOptions":
        return cls(**{**data, "delete": tuple(data.get("delete", ()))})


def version_name(index: str, now: datetime | None = None) -> str:
    """Name of the version a run produces: the index and the UTC build time, to the millisecond."""
    now = now or datetime.now(timezone.utc)
    return f"{index}_{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"


@dataclass
class RunState:
    """What one run has decided and done so far, so that its steps can run in separate processes.

    The in-process runner keeps it in memory; orchestrated runs (``pipeline.steps``, the Airflow
    DAGs) save it in the run's registry row after each step and load it in the next. It holds ids,
    hashes and counts, never document texts, chunks or vectors.
    """

    summary: RunSummary
    options: RunOptions = RunOptions()
    chunker_version: str = ""
    seq: int | None = None  # the staged version's sequence number
    parent: str | None = None
    to_write: list[dict[str, Any]] = field(default_factory=list)  # new, changed, metadata-only documents
    to_chunk: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    chunk_counts: dict[str, int] = field(default_factory=dict)
    staged_chunks: int = 0
    to_embed: int = 0  # orchestrated runs: chunk texts handed to embedding tasks
    cached_before: int = 0  # orchestrated runs: chunk texts already in the cache when staged
    batches: list[str] = field(default_factory=list)  # orchestrated runs: the embedding work lists' URIs
    listing: dict[str, Any] | None = None  # object stores: what to record of the listing once the run succeeded
    added_rows: int = 0
    new_segments: list[str] = field(default_factory=list)  # the segments the built version added
    retired_rows: int = 0
    version_chunks: int | None = None  # the built version's chunks, as validation counted them
    step: str = "started"  # the last step finished: planned, staged, embedded, built, validated, published, done

    @property
    def changed(self) -> bool:
        return bool(self.to_write or self.deleted or self.options.full)

    def documents(self) -> list[SourceDocument]:
        """The documents to write, without their texts (what publishing records)."""
        return [SourceDocument(d["doc_id"], "", d["source_uri"], d["format"], d["metadata"], d["content_hash"],
                               d["metadata_hash"], parse_time(d["valid_from"]), extraction=d.get("extraction", ""))
                for d in self.to_write]

    def valid_from(self) -> dict[str, datetime | None]:
        return {d["doc_id"]: parse_time(d["valid_from"]) for d in self.to_write}

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("summary", "options")}
        return {**out, "summary": self.summary.to_dict(), "options": self.options.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunState":
        data = dict(data)
        summary = RunSummary(**data.pop("summary"))
        return cls(summary=summary, options=RunOptions.from_json(data.pop("options")), **data)


def doc_record(doc: SourceDocument) -> dict[str, Any]:
    return {"doc_id": doc.doc_id, "source_uri": doc.source_uri, "format": doc.format, "metadata": doc.metadata,
            "content_hash": doc.content_hash, "metadata_hash": doc.metadata_hash,
            "valid_from": doc.valid_from.isoformat() if doc.valid_from else None, "extraction": doc.extraction}


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def artifact_store(config: IndexConfig, home: Path) -> ArtifactStore:
    """The configured artifact store; by default a directory under the ragpipe home."""
    return ArtifactStore(config.artifacts or str(home / "artifacts"), home / "cache")


@dataclass
class RunContext:
    """What every stage of a run works with, built once per run (or per orchestrated step)."""

    registry: Registry
    embedder: Embedder  # None in steps that embed nothing and read no model (publish, gc)
    config: IndexConfig
    store: ArtifactStore
    memo: dict[Any, Any] = field(default_factory=dict)  # what one stage read and a later one reuses

    @classmethod
    def of(cls, registry: Registry, embedder: Embedder | None, config: IndexConfig) -> "RunContext":
        return cls(registry, embedder, config, artifact_store(config, registry.home))  # type: ignore[arg-type]

    @cached_property
    def segments(self) -> SegmentArtifacts:
        return SegmentArtifacts(self.store, self.config.index)

    @property
    def index(self) -> str:
        return self.config.index


@contextmanager
def stage_timer(state: RunState, name: str) -> Iterator[None]:
    """Add the seconds the block takes to the summary's ``stage_seconds[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = state.summary.stage_seconds
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 4)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from registry.extras import require

    tqdm = require("tqdm", "pipeline", "the progress bar").tqdm
    return tqdm(total=total, desc=desc, unit="chunk", leave=False, file=sys.stderr)

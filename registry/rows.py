"""Typed rows the registry's named queries return (psycopg ``class_row``), what other modules read.

A row type has one field per column its queries select, named and ordered as in their SELECT in
registry/queries.sql (a subclass's columns follow its base's): ``class_row`` passes the columns by
name (a column without a field fails), and ``dataclasses.asdict`` of a row gives the columns in
query order (the CLI's JSON output). :data:`QUERY_ROWS` names each query's row type;
``tests/test_registry.py::test_each_typed_query_selects_exactly_its_row_fields`` checks every entry.
JSON columns (``manifest``, ``metrics``, ``counts``, ...) stay parsed JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class RunListing:
    """A run as ``runs list`` shows it."""

    run_id: int
    index_name: str
    source: str
    owner: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, Any]
    stage_seconds: dict[str, Any]
    error: str | None


@dataclass(frozen=True, slots=True)
class RunRow(RunListing):
    """One recorded run, with the documents it skipped."""

    skipped: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A chunk of a version (or of the live state): what a build writes into the chunk table."""

    chunk_key: int
    chunk_id: str
    doc_id: str
    chunk_hash: str
    ordinal: int
    heading_path: list[str]
    char_start: int
    char_end: int
    token_count: int
    text: str
    context: str
    page_start: int | None  # the physical pages (and labels) of a chunk of a document that has pages
    page_end: int | None
    page_label_start: str | None
    page_label_end: str | None


@dataclass(frozen=True, slots=True)
class DocumentFields:
    """The fields of a document that a chunk table repeats on each of its chunks."""

    doc_id: str
    source_uri: str
    metadata: dict[str, Any]
    valid_from: datetime | None


@dataclass(frozen=True, slots=True)
class VersionRef:
    """The head version of an index, what a run builds on."""

    version: str
    version_seq: int
    model_id: str
    artifact_uri: str | None
    manifest: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class UnfinishedVersion:
    """A version a killed run left built or validated, never published."""

    version: str
    version_seq: int
    artifact_uri: str | None


@dataclass(frozen=True, slots=True)
class VersionColumns:
    """What both version queries select of a version."""

    version: str
    version_seq: int
    status: str
    parent_version: str | None
    model_id: str
    full_build: bool
    artifact_uri: str | None
    metrics: dict[str, Any]
    reason: str | None
    created_at: datetime
    published_at: datetime | None


@dataclass(frozen=True, slots=True)
class VersionListing(VersionColumns):
    """A version as ``versions list`` shows it: its chunk count and the roles it has."""

    chunks: int | None
    live: bool
    shadow: bool
    head: bool
    canary: bool

    @property
    def role(self) -> str | None:
        """The roles it has ("live", "canary", "shadow", "head", comma-separated), None for none."""
        return ",".join(name for name, has in (("live", self.live), ("canary", self.canary), ("shadow", self.shadow),
                                               ("head", self.head)) if has) or None


@dataclass(frozen=True, slots=True)
class VersionRow(VersionColumns):
    """Everything the registry records of one version."""

    index_name: str
    run_id: int | None
    manifest: dict[str, Any] | None
    validated_at: datetime | None
    retired_at: datetime | None


@dataclass(frozen=True, slots=True)
class AliasRow:
    """An alias and what it serves."""

    alias: str
    index_name: str
    version: str
    shadow_version: str | None
    updated_at: datetime
    model_id: str
    chunks: int | None
    canary_version: str | None = None
    canary_percent: float | None = None


@dataclass(frozen=True, slots=True)
class CanaryRow:
    """An alias's canary: the version that gets ``canary_percent`` of requests, and its guards."""

    alias: str
    index_name: str
    version: str  # the live version
    canary_version: str
    canary_percent: float
    canary_guards: list[dict[str, Any]]
    canary_min_queries: int
    canary_started_at: datetime


@dataclass(frozen=True, slots=True)
class VersionStatsSums:
    """Serving statistics of a version in one role, summed over every write of every process."""

    version: str
    role: str
    queries: int
    compared: int
    overlap_sum: float
    latency_buckets: list[int] | None


@dataclass(frozen=True, slots=True)
class SourceObjectRow:
    """What the registry remembers of one object of an object-store source: how it was listed when
    last read, under which chunker and extractor configuration, and what it became (a document's
    content hash, or the reason its content cannot be indexed)."""

    doc_id: str
    etag: str | None
    size: int
    mtime: datetime | None
    fingerprint: str
    content_hash: str | None
    skip_reason: str | None
    skip_gone: bool


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """A score given to a served response (``chunk_id`` None) or to one of its hits."""

    request_id: str
    index_name: str
    alias: str
    version: str
    chunk_id: str | None
    kind: str
    source: str
    score: float
    query: str | None


@dataclass(frozen=True, slots=True)
class QualityRow:
    """The feedback of one version, one kind and one source: how many scores and their mean."""

    index_name: str
    version: str
    status: str
    kind: str
    source: str
    count: int
    mean: float
    first_at: datetime
    last_at: datetime


QUERY_ROWS: dict[str, type] = {
    "list_runs": RunListing,
    "get_run": RunRow,
    "member_rows_page": ChunkRow,
    "member_rows": ChunkRow,
    "active_chunks": ChunkRow,
    "document_fields": DocumentFields,
    "head_version": VersionRef,
    "unfinished_versions": UnfinishedVersion,
    "list_versions": VersionListing,
    "get_version": VersionRow,
    "list_aliases": AliasRow,
    "get_canary": CanaryRow,
    "version_stats_of_index": VersionStatsSums,
    "canary_stats": VersionStatsSums,
    "source_objects": SourceObjectRow,
    "quality_report": QualityRow,
}
"""The row type of each named query that returns typed rows (registry.queries.fetch_all / fetch_one)."""

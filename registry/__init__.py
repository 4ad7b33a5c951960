"""The doc-chunk registry in PostgreSQL: the source of truth for lineage; the only package that speaks SQL."""

from registry.config import RegistryConfig
from registry.errors import IndexLocked, MigrationError, RegistryError, RegistryUnavailable, RunNotRunning
from registry.rows import (
    AliasRow,
    ChunkRow,
    DocumentFields,
    FeedbackEntry,
    QualityRow,
    RunListing,
    RunRow,
    UnfinishedVersion,
    VersionListing,
    VersionRef,
    VersionRow,
)
from registry.store import DocumentState, Registry
from registry.versions import AliasError, AliasMove

__all__ = [
    "AliasError",
    "AliasMove",
    "AliasRow",
    "ChunkRow",
    "DocumentFields",
    "DocumentState",
    "FeedbackEntry",
    "IndexLocked",
    "MigrationError",
    "QualityRow",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnavailable",
    "RunListing",
    "RunNotRunning",
    "RunRow",
    "UnfinishedVersion",
    "VersionListing",
    "VersionRef",
    "VersionRow",
]

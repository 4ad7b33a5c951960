"""The doc-chunk registry in PostgreSQL: the source of truth for lineage; the only package that speaks SQL."""

from registry.config import RegistryConfig
from registry.errors import IndexLocked, MigrationError, RegistryError, RegistryUnavailable, RunNotRunning
from registry.rows import (
    AliasRow,
    CanaryRow,
    ChunkRow,
    DocumentFields,
    FeedbackEntry,
    QualityRow,
    RunListing,
    RunRow,
    SourceObjectRow,
    UnfinishedVersion,
    VersionListing,
    VersionRef,
    VersionRow,
)
from registry.store import DocumentState, Registry
from registry.rollout_stats import Guard, StatsDelta, VersionStats
from registry.versions import AliasError, AliasMove

__all__ = [
    "AliasError",
    "AliasMove",
    "AliasRow",
    "CanaryRow",
    "ChunkRow",
    "DocumentFields",
    "DocumentState",
    "FeedbackEntry",
    "Guard",
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
    "SourceObjectRow",
    "StatsDelta",
    "UnfinishedVersion",
    "VersionListing",
    "VersionRef",
    "VersionRow",
    "VersionStats",
]

"""The doc-chunk registry in PostgreSQL: the source of truth for lineage; the only package that speaks SQL."""

from registry.config import RegistryConfig
from registry.errors import IndexLocked, MigrationError, RegistryError, RegistryUnavailable, RunNotRunning
from registry.store import DocumentState, Registry
from registry.versions import AliasError, AliasMove, VersionRef

__all__ = [
    "AliasError",
    "AliasMove",
    "VersionRef",
    "DocumentState",
    "IndexLocked",
    "MigrationError",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnavailable",
    "RunNotRunning",
]

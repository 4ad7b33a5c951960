"""The doc-chunk registry in PostgreSQL: the source of truth for lineage; the only package that speaks SQL."""

from registry.config import RegistryConfig
from registry.errors import IndexLocked, MigrationError, RegistryError, RegistryUnavailable
from registry.store import ApplyResult, DocumentState, Registry

__all__ = [
    "ApplyResult",
    "DocumentState",
    "IndexLocked",
    "MigrationError",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnavailable",
]

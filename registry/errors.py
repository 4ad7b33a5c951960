"""Registry errors, split into terminal (fix something, then rerun) and transient (retry)."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry error."""

    transient = False


class RegistryUnavailable(RegistryError):
    """The database cannot be reached right now; retrying later may succeed."""

    transient = True


class MigrationError(RegistryError):
    """A migration file is malformed or failed to apply."""


class IndexLocked(RegistryError):
    """Another process holds the index's publisher lock."""

    transient = True

"""Registry errors, split into terminal (fix something, then rerun) and transient (retry)."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry error."""

    transient = False


class RegistryUnavailable(RegistryError):
    """The database cannot be reached right now; retrying later may succeed."""

    transient = True


class ConnectionLost(RegistryUnavailable):
    """The server dropped a connection (restart, failover, idle kill) while it was in use or held
    session state (an advisory lock); what was in flight may not have happened: retry."""


class DatabaseUrlInvalid(RegistryError):
    """The registry database URL cannot be parsed; fix the configuration."""


class MigrationError(RegistryError):
    """A migration file is malformed or failed to apply."""


class IndexLocked(RegistryError):
    """Another process holds the index's publisher lock."""

    transient = True


class MissingExtra(RegistryError):
    """A feature needs an optional part of ragpipe that is not installed; the message names the extra."""


class RunNotRunning(RegistryError):
    """A step of an orchestrated run found its run finished, failed or taken over by a newer run."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed: an unreachable or failing database connection, I/O
    trouble, or an error that says so (``transient = True``)."""
    import psycopg

    if isinstance(exc, (psycopg.OperationalError, OSError, TimeoutError)):
        return True
    return bool(getattr(exc, "transient", False))

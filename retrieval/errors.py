"""Retrieval errors: each names what was asked for and what to do next."""

from __future__ import annotations

from registry.errors import MissingExtra  # noqa: F401  (a registry error: raised by any package's optional feature)


class RetrievalError(Exception):
    """Base class of every retrieval error."""

    transient = False


class ModelError(RetrievalError):
    """A model cannot be loaded, or returned vectors of the wrong shape."""


class EndpointUnavailable(ModelError):
    """An embeddings endpoint kept failing (429, 5xx, unreachable) after its retries: retry later."""

    transient = True


class ModelMismatch(RetrievalError):
    """The query encoder is not the model the version's vectors were made with."""


class AliasNotFound(RetrievalError):
    """The alias does not exist (nothing has been published to it yet)."""


class VersionUnavailable(RetrievalError):
    """The version's files cannot be read."""

    transient = True


class VersionCorrupt(VersionUnavailable):
    """The version's files are damaged: missing, truncated, unparsable or not matching their checksums.

    Terminal: the files are immutable, so reading them again cannot help; rebuild the version or
    serve another one."""

    transient = False

"""Pipeline errors: terminal ones fail a run (and an Airflow task) without retry, transient ones retry."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every pipeline error."""

    transient = False


class ConfigError(PipelineError):
    """The configuration is invalid; fix it and rerun."""


class SourceUnavailable(PipelineError):
    """The source as a whole cannot be read (missing, not readable); nothing was changed."""


class UnsafeDeletion(PipelineError):
    """The run would delete every document of a non-empty index; refused unless explicitly allowed."""


class EmbeddingError(PipelineError):
    """The embedding model failed or returned vectors of the wrong shape."""


class ModelLockError(PipelineError):
    """The model's files changed under the same model id: cached vectors would mix two models."""


class VersionRejected(PipelineError):
    """A built version failed validation; it is recorded as rejected and the alias did not move."""


class ArtifactWriteError(PipelineError):
    """A version's files could not be written (a full disk, an I/O error); nothing was published.

    Transient: the run's embeddings are cached, so a rerun once the cause is fixed redoes no
    embedding."""

    transient = True


class SourceUnreachable(SourceUnavailable):
    """The source's store did not answer (a network failure, a timeout); nothing was changed."""

    transient = True

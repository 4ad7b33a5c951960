"""Registry configuration, read from RAGPIPE_* environment variables at run time."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry lives.

    Attributes:
        database_url: libpq URL of a PostgreSQL server; None starts the embedded server.
        home: ragpipe's home directory (embedded server data, artifacts).
    """

    database_url: str | None = None
    home: Path = Path(".ragpipe")

    @classmethod
    def from_env(cls, **overrides: object) -> "RegistryConfig":
        """Build from ``RAGPIPE_DATABASE_URL`` and ``RAGPIPE_HOME``; non-None overrides win."""
        config = cls(
            database_url=os.environ.get("RAGPIPE_DATABASE_URL") or None,
            home=Path(os.environ.get("RAGPIPE_HOME") or ".ragpipe"),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "home" in given:
            given["home"] = Path(given["home"])  # type: ignore[arg-type]
        return replace(config, **given)  # type: ignore[arg-type]

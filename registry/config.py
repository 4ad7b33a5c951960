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


def dsn_from_parts(
    *, host: str | None, port: int | None, user: str | None, password: str | None, dbname: str | None,
) -> str:
    """A libpq connection string from separate fields (e.g. an Airflow Connection); empty ones are left out."""
    from psycopg.conninfo import make_conninfo

    parts = {"host": host, "port": port, "user": user, "password": password, "dbname": dbname}
    return make_conninfo(**{k: str(v) for k, v in parts.items() if v not in (None, "")})

"""Registry storage: connecting to PostgreSQL (configured or embedded) and applying migrations."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

from registry.errors import MigrationError, RegistryUnavailable

logger = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same for every process that migrates.
_MIGRATION_LOCK_KEY = 0x7261_6770_6970_6501  # "ragpipe" + 1


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def list_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Return the numbered migrations in ``sql_dir`` in the order they apply.

    Raises:
        MigrationError: two files share a number.
    """
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _MIGRATION_NAME.fullmatch(path.name)
        if not match:
            continue  # schema.sql and other helpers are not migrations
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"migrations {found[version].path.name} and {path.name} share number {version}")
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


def resolve_database_url(database_url: str | None, home: Path) -> str:
    """Return a libpq URL: the one given, else an embedded server under ``home``.

    The embedded server (the ``pgserver`` package) is started on demand and keeps its data in
    ``home/pgdata``; it stops when the last process using it exits.
    """
    if database_url:
        return database_url
    return _embedded_url(home)


_EMBEDDED: dict[Path, object] = {}


def _embedded_url(home: Path) -> str:
    pgdata = (home / "pgdata").resolve()
    server = _EMBEDDED.get(pgdata)
    if server is None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                import pgserver
        except ImportError as exc:  # pragma: no cover - pgserver is a declared dependency
            raise RegistryUnavailable("no RAGPIPE_DATABASE_URL and the pgserver package is missing") from exc
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # pgserver puts its Unix socket inside pgdata; libpq caps socket paths at 107 bytes.
        if len(str(pgdata)) > 90:
            raise RegistryUnavailable(
                f"embedded PostgreSQL needs a shorter RAGPIPE_HOME (socket path under {pgdata} would be too long)"
            )
        logger.info("starting embedded PostgreSQL in %s", pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        _EMBEDDED[pgdata] = server
    return server.get_uri()  # type: ignore[attr-defined]


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection, turning connection failures into :class:`RegistryUnavailable`."""
    try:
        return psycopg.connect(url, autocommit=autocommit, application_name="ragpipe")
    except psycopg.OperationalError as exc:
        raise RegistryUnavailable(f"cannot connect to the registry database: {_redact(str(exc))}") from exc


def _redact(message: str) -> str:
    return re.sub(r"(password=)\S+", r"\1***", message)


def upgrade(conn: psycopg.Connection, sql_dir: Path = SQL_DIR) -> list[int]:
    """Apply every migration not yet recorded, in order, each in its own transaction.

    Safe to run twice and from several processes at once: a session advisory lock serialises
    migrators, and each migration is recorded in ``schema_migrations`` in the same transaction
    that applies it.

    Returns:
        The versions applied by this call (empty when the schema was current).
    """
    migrations = list_migrations(sql_dir)
    applied_now: list[int] = []
    previous_autocommit = conn.autocommit
    conn.autocommit = True
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in done:
                    continue
                sql_text = migration.path.read_text(encoding="utf-8")
                try:
                    with conn.transaction():
                        conn.execute(sql_text)  # type: ignore[arg-type]  # trusted file, many statements
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                            (migration.version, migration.name),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {migration.path.name} failed: {exc}") from exc
                logger.info("applied migration %s", migration.path.name)
                applied_now.append(migration.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    finally:
        conn.autocommit = previous_autocommit
    return applied_now


def current_version(conn: psycopg.Connection) -> int:
    """Return the highest applied migration number, 0 for an empty database."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def ensure_schema(url: str) -> None:
    """Apply pending migrations when the database is behind (first use)."""
    latest = list_migrations()[-1].version
    with connect(url, autocommit=True) as conn:
        if current_version(conn) < latest:
            upgrade(conn)


@contextmanager
def scratch_database(database_url: str | None, home: Path, keep: bool = False) -> Iterator[str]:
    """Create an empty database on the configured server, yield its URL, drop it afterwards.

    Replays and benchmarks use one so that their counts start from an empty cache and never touch
    real indexes.
    """
    server_url = resolve_database_url(database_url, home)
    name = f"ragpipe_scratch_{os.getpid()}_{int(time.time() * 1000)}"
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield conninfo.make_conninfo(server_url, dbname=name)
    finally:
        if not keep:
            with connect(server_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

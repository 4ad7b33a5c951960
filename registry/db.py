"""Registry storage: connecting to PostgreSQL (configured or embedded) and applying migrations."""

from __future__ import annotations

import logging
import os
import random
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import psycopg
from psycopg import conninfo, sql

from registry.errors import ConnectionLost, DatabaseUrlInvalid, MigrationError, RegistryUnavailable
from registry.extras import require

logger = logging.getLogger(__name__)



def _sql_dir() -> Path:
    """The migrations: ``registry/migrations`` in an installed package (the build ships ``sql/``
    there), else ``sql/`` beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "migrations"
    return installed if any(installed.glob("[0-9]*.sql")) else here.parent / "sql"


SQL_DIR = _sql_dir()
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            pgserver = require("pgserver", "embedded", "the embedded PostgreSQL (no RAGPIPE_DATABASE_URL is set)")
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


APPLICATION_NAME = "ragpipe"  # how the registry's sessions show in pg_stat_activity


def connect(url: str, *, autocommit: bool = False, application_name: str = APPLICATION_NAME) -> psycopg.Connection:
    """Open a connection, turning connection failures into registry errors without the password.

    Raises:
        RegistryUnavailable: the server cannot be reached or refused the connection (transient).
        DatabaseUrlInvalid: the URL cannot be parsed (terminal: fix the configuration).
    """
    try:
        return psycopg.connect(url, autocommit=autocommit, application_name=application_name)
    except psycopg.OperationalError as exc:
        raise RegistryUnavailable(f"cannot connect to the registry database: {one_line(redact(str(exc), url))}; "
                                  f"retry later") from None
    except psycopg.ProgrammingError as exc:  # libpq could not parse the conninfo
        raise DatabaseUrlInvalid(f"the registry database URL is invalid: {one_line(redact(str(exc), url))}") from None


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with jitter, for reconnecting.

    Attributes:
        initial: the first delay in seconds; each next one doubles, up to ``maximum``.
        maximum: the longest delay.
        budget: stop once the delays add up to this many seconds; None never stops.
    """

    initial: float = 0.1
    maximum: float = 2.0
    budget: float | None = 10.0

    def delays(self, limit: int | None = None) -> Iterator[float]:
        """The delays to sleep before each next attempt. Each is drawn from the upper half of its
        step ("equal jitter"), so that processes dropped together do not reconnect in lockstep."""
        spent, step, n = 0.0, self.initial, 0
        while (self.budget is None or spent < self.budget) and (limit is None or n < limit):
            delay = random.uniform(step / 2, step)
            spent += delay
            n += 1
            yield delay
            step = min(step * 2, self.maximum)


def connect_with_backoff(url: str, backoff: Backoff, *, autocommit: bool = True,
                         application_name: str = APPLICATION_NAME) -> psycopg.Connection:
    """Connect, retrying while the server is unreachable, for at most ``backoff.budget`` seconds.

    Raises:
        RegistryUnavailable: still unreachable when the budget ran out.
        DatabaseUrlInvalid: the URL cannot be parsed (never retried).
    """
    attempts = 0
    started = time.monotonic()
    for delay in backoff.delays():
        attempts += 1
        try:
            return connect(url, autocommit=autocommit, application_name=application_name)
        except RegistryUnavailable as exc:
            logger.warning("registry database unreachable (%s); reconnect attempt %d in %.2f s", exc, attempts + 1,
                           delay)
            time.sleep(delay)
    try:  # the last attempt, once the budget is spent
        return connect(url, autocommit=autocommit, application_name=application_name)
    except RegistryUnavailable as exc:
        raise RegistryUnavailable(f"{exc} (gave up reconnecting after {attempts + 1} attempts over "
                                  f"{time.monotonic() - started:.1f} s)") from None


# The password in URL userinfo (scheme://user:PASSWORD@host) and in key=value conninfo (quoted or not).
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(message: str, url: str | None = None) -> str:
    """``message`` without any password: URL userinfo and ``password=`` values are masked, and so is
    every occurrence of ``url``'s own password (raw, as written, or percent-decoded), which libpq and
    psycopg quote in their errors, e.g. a badly percent-encoded one."""
    secrets = _passwords_in(url) if url else set()
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    message = _URL_PASSWORD.sub(r"\1***\3", message)
    return _KEYWORD_PASSWORD.sub(r"\1***", message)


def _passwords_in(url: str) -> set[str]:
    found = {m.group(2) for m in _URL_PASSWORD.finditer(url)}
    found |= {m.group(2).strip("'") for m in _KEYWORD_PASSWORD.finditer(url)}
    found |= {unquote(s) for s in found}
    try:
        password = conninfo.conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    return {s for s in found if s}


def one_line(message: str) -> str:
    """libpq's multi-line messages as one line."""
    return " ".join(message.split())


def connection_error(exc: BaseException, url: str | None = None) -> RegistryUnavailable | None:
    """A registry error for a database failure that surfaced as a raw psycopg error (a connection the
    server dropped, a failover, a transaction lost mid-way), or None when ``exc`` is not one."""
    if isinstance(exc, RegistryUnavailable):
        return exc
    if not isinstance(exc, psycopg.OperationalError):
        return None
    message = one_line(redact(str(exc), url))
    state = exc.sqlstate or ""
    # no SQLSTATE: the client found the socket gone; 08: connection exception; 57P: the server shut down
    if not state or state.startswith(("08", "57P")):
        return ConnectionLost(f"lost the connection to the registry database ({message}); retry")
    return RegistryUnavailable(f"the registry database failed ({message}); retry")


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
    migrations = list_migrations()
    if not migrations:
        raise MigrationError(f"no migrations found in {SQL_DIR}: the package is incomplete; reinstall ragpipe")
    latest = migrations[-1].version
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
    try:
        yield create_database(server_url, name)
    finally:
        if not keep:
            drop_database(server_url, name)


def create_database(server_url: str, name: str) -> str:
    """Create the empty database ``name`` on the server ``server_url`` reaches; return its URL."""
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return conninfo.make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, name: str) -> None:
    """Drop the database ``name`` (closing its connections) when it exists."""
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

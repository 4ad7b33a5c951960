"""Print the schema the migrations produce (``make schema`` writes it to sql/schema.sql)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from psycopg import conninfo

from registry import db
from registry.config import RegistryConfig
from registry.errors import DatabaseUrlInvalid

HEADER = "-- The current schema, generated from the migrations (make schema); a test keeps the two equal.\n"
# libpq's environment variable for each connection keyword: what pg_dump is given instead of argv,
# where any local user could read the password (ps, /proc/PID/cmdline).
_ENVIRONMENT = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "passfile": "PGPASSFILE", "service": "PGSERVICE", "options": "PGOPTIONS",
    "application_name": "PGAPPNAME", "connect_timeout": "PGCONNECT_TIMEOUT", "client_encoding": "PGCLIENTENCODING",
    "channel_binding": "PGCHANNELBINDING", "sslmode": "PGSSLMODE", "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI", "requirepeer": "PGREQUIREPEER", "require_auth": "PGREQUIREAUTH",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION", "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE", "krbsrvname": "PGKRBSRVNAME", "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}


def libpq_environment(url: str) -> dict[str, str]:
    """The ``PG*`` environment variables that connect a libpq program (pg_dump) where ``url`` does.

    Raises:
        DatabaseUrlInvalid: the URL has a setting libpq reads from no environment variable.
    """
    env = {}
    for key, value in conninfo.conninfo_to_dict(url).items():
        if key not in _ENVIRONMENT:
            raise DatabaseUrlInvalid(f"the database URL's setting {key!r} cannot be passed to pg_dump")
        env[_ENVIRONMENT[key]] = str(value)
    return env


_NOISE = re.compile(r"^--( Dumped| PostgreSQL database dump|$)|^SET |^SELECT pg_catalog\.set_config|^\\(un)?restrict")


def main() -> int:
    config = RegistryConfig.from_env()
    if not shutil.which("pg_dump"):
        print("pg_dump is not installed", file=sys.stderr)
        return 1
    with db.scratch_database(config.database_url, config.home) as url:
        with db.connect(url, autocommit=True) as conn:
            db.upgrade(conn)
        env = os.environ | libpq_environment(url)  # as with a URL on argv, the URL's settings win
        done = subprocess.run(
            ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "--exclude-table=schema_migrations"],
            capture_output=True, text=True, env=env,
        )
        if done.returncode != 0:
            print(f"pg_dump failed: {db.one_line(db.redact(done.stderr, url))}", file=sys.stderr)
            return 1
        dump = done.stdout
    lines = [line for line in dump.splitlines() if not _NOISE.match(line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    sys.stdout.write(HEADER + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

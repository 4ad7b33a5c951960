"""Print the schema the migrations produce (``make schema`` writes it to sql/schema.sql)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from registry import db
from registry.config import RegistryConfig

HEADER = "-- The current schema, generated from the migrations (make schema); a test keeps the two equal.\n"
_NOISE = re.compile(r"^--( Dumped| PostgreSQL database dump|$)|^SET |^SELECT pg_catalog\.set_config|^\\(un)?restrict")


def main() -> int:
    config = RegistryConfig.from_env()
    if not shutil.which("pg_dump"):
        print("pg_dump is not installed", file=sys.stderr)
        return 1
    with db.scratch_database(config.database_url, config.home) as url:
        with db.connect(url, autocommit=True) as conn:
            db.upgrade(conn)
        dump = subprocess.run(
            ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "--exclude-table=schema_migrations", url],
            check=True, capture_output=True, text=True,
        ).stdout
    lines = [line for line in dump.splitlines() if not _NOISE.match(line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    sys.stdout.write(HEADER + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

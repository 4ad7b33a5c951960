"""Named runtime queries, parsed once from registry/queries.sql, and their typed rows (registry.rows)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import class_row

from registry.rows import QUERY_ROWS

_QUERIES_FILE = Path(__file__).with_name("queries.sql")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of ``-- name: X`` sections into ``{X: sql}`` (comments kept, trailing ';' dropped)."""
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip().rstrip(";").strip()
    return queries


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    return parse_queries(_QUERIES_FILE.read_text(encoding="utf-8"))


def q(name: str) -> str:
    """Return the SQL of the named query."""
    return queries()[name]



R = TypeVar("R")


def _row_of(name: str, row: type[R]) -> type[R]:
    if QUERY_ROWS.get(name) is not row:
        raise TypeError(f"query {name!r} returns {QUERY_ROWS.get(name)}, not {row.__name__} (registry.rows.QUERY_ROWS)")
    return row


def fetch_all(conn: psycopg.Connection, name: str, row: type[R], params: dict[str, Any] | None = None) -> list[R]:
    """Run the named query; return its rows as ``row``, the query's type in :data:`registry.rows.QUERY_ROWS`."""
    with conn.cursor(row_factory=class_row(_row_of(name, row))) as cur:
        cur.execute(q(name), params)
        return cur.fetchall()


def fetch_one(conn: psycopg.Connection, name: str, row: type[R], params: dict[str, Any] | None = None) -> R | None:
    """Run the named query; return its first row as ``row`` (see :func:`fetch_all`), None when there is none."""
    with conn.cursor(row_factory=class_row(_row_of(name, row))) as cur:
        cur.execute(q(name), params)
        return cur.fetchone()

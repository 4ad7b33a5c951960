"""Named runtime queries, parsed once from registry/queries.sql."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

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

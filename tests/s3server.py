"""A real S3 API for the tests: moto's standalone server on a free loopback port, and its request log."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ?"]*)(\?[^ "]*)? HTTP')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RequestLog(logging.Handler):
    """Every request the server answered, as (method, path without the query, query)."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self)

    def __hash__(self) -> int:
        return id(self)

    def emit(self, record: logging.LogRecord) -> None:
        m = _REQUEST.search(record.getMessage())
        if m:
            self.requests.append((m.group(1), m.group(2), m.group(3) or ""))

    def object_reads(self, bucket: str) -> list[str]:
        """The keys of ``bucket`` read or probed (GET or HEAD of an object, not a listing)."""
        return [path.split("/", 2)[2] for method, path, query in self.requests
                if method in ("GET", "HEAD") and path.startswith(f"/{bucket}/") and "list-type" not in query
                and len(path) > len(bucket) + 2]


@contextmanager
def request_log() -> Iterator[RequestLog]:
    """Record the requests the server answers within the block (werkzeug logs each one)."""
    logger = logging.getLogger("werkzeug")
    handler = RequestLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

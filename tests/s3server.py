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


def s3_client(endpoint: str, monkeypatch, key_id: str, secret: str):  # type: ignore[no-untyped-def]
    """A client of the server at ``endpoint``; the standard AWS variables point ragpipe at it too."""
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1")


def keys(client, bucket: str, prefix: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    """Every object key of ``bucket`` under ``prefix``, sorted."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

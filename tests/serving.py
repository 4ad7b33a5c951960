"""A real uvicorn server on a free port in a thread of the test process, for the service's tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app: Any, ready_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yields the base URL once /readyz answers 200."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while call(base, "/readyz")[0] != 200:
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError(f"the service never became ready: {call(base, '/readyz')}")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(base: str, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int | None, Any, dict[str, str]]:
    """(status, JSON body or text, headers) of one request; status None when nothing answered."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, text, got = exc.code, exc.read(), dict(exc.headers)
    except OSError:
        return None, None, {}
    try:
        return status, json.loads(text), got
    except ValueError:
        return status, text.decode(), got

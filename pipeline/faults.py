"""Fault injection for crash tests: a named point kills or pauses the process when a test asks for it.

``RAGPIPE_TEST_KILL_AT=NAME`` (or ``NAME@N`` for the N-th time the point is reached) makes
:func:`checkpoint` send SIGKILL to the current process. ``RAGPIPE_TEST_PAUSE_AT=NAME`` (or ``NAME@N``)
with ``RAGPIPE_TEST_PAUSE_FILE=PATH`` creates PATH there and waits until the test removes it, so
that the test can act on the process's surroundings (drop its database connections) at that point.
Nothing sets them outside the test suite.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}
_PAUSE_LIMIT_S = 300.0  # a test that never removes the file does not hang the process forever


def checkpoint(name: str) -> None:
    """Mark a named point of the pipeline; kill or pause the process here if a test asked for it."""
    kill_at = os.environ.get("RAGPIPE_TEST_KILL_AT")
    pause_at = os.environ.get("RAGPIPE_TEST_PAUSE_AT")
    if not kill_at and not pause_at:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _reached(kill_at, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _reached(pause_at, name):
        _pause(Path(os.environ["RAGPIPE_TEST_PAUSE_FILE"]))


def _reached(spec: str | None, name: str) -> bool:
    if not spec:
        return False
    target, _, nth = spec.partition("@")
    return target == name and _hits[name] == int(nth or 1)


def _pause(marker: Path) -> None:
    marker.touch()
    deadline = time.monotonic() + _PAUSE_LIMIT_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

"""Fault injection for crash tests: a named point kills the process when a test asks for it.

``RAGPIPE_TEST_KILL_AT=NAME`` (or ``NAME@N`` for the N-th time the point is reached) makes
:func:`checkpoint` send SIGKILL to the current process. Nothing sets it outside the test suite.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def checkpoint(name: str) -> None:
    """Mark a named point of the pipeline; kill the process here if a test asked for it."""
    spec = os.environ.get("RAGPIPE_TEST_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

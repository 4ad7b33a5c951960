"""Alias-change notifications: a connection of its own LISTENs on the registry's alias channel.

Readers that follow an alias (``retrieval.Retriever``) iterate :meth:`AliasListener.changes` in a
background thread. The listener reconnects with backoff whenever the server drops its connection
and, each time it is connected again, tells the reader to re-check, since notifications sent in
between are gone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg

from registry import db
from registry.errors import RegistryUnavailable
from registry.queries import q

logger = logging.getLogger(__name__)

_WAIT_S = 0.25  # one wait for notifications; short, so that stopping is prompt


@dataclass(frozen=True)
class AliasChange:
    """One event for a reader: an alias moved (``alias`` set), or ``alias`` None when the reader
    should re-check anyway (just (re)connected, or its poll interval passed)."""

    alias: str | None
    version: str | None = None
    action: str | None = None

    @classmethod
    def from_payload(cls, payload: str) -> "AliasChange":
        try:
            data = json.loads(payload)
            return cls(str(data["alias"]), data.get("version"), data.get("action"))
        except (ValueError, KeyError, TypeError):  # not ours: re-check rather than guess
            return cls(None)


class AliasListener:
    """LISTEN for alias moves on a dedicated connection that survives the server dropping it.

    Args:
        url: the registry database.
        poll_interval: also yield a re-check this often, in case a notification went missing.
        backoff: delays between reconnection attempts (past its budget, if any, it goes on at its maximum:
            a listener never gives up).
        stable_after: seconds a connection must stay up before the next drop starts from the first delay.
    """

    def __init__(self, url: str, *, poll_interval: float = 5.0,
                 backoff: db.Backoff = db.Backoff(maximum=5.0, budget=None), stable_after: float = 10.0) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.stable_after = stable_after
        self._up_since: float | None = None

    def changes(self, stop: threading.Event) -> Iterator[AliasChange]:
        """Yield alias changes until ``stop`` is set; never raises for a lost or unreachable database."""
        delays = self.backoff.delays()
        while not stop.is_set():
            self._up_since = None
            try:
                yield from self._listen(stop)
            except (psycopg.OperationalError, RegistryUnavailable) as exc:
                if stop.is_set():
                    return
                if self._up_since is not None and time.monotonic() - self._up_since >= self.stable_after:
                    delays = self.backoff.delays()  # it had been up a while: start again from the first delay
                delay = next(delays, self.backoff.maximum)
                logger.warning("alias listener: %s; reconnecting in %.2f s",
                               db.one_line(db.redact(str(exc), self.url)), delay)
                stop.wait(delay)

    def _listen(self, stop: threading.Event) -> Iterator[AliasChange]:
        with db.connect(self.url, autocommit=True, application_name=f"{db.APPLICATION_NAME}-listener") as conn:
            conn.execute(q("listen_alias"))
            self._up_since = time.monotonic()
            yield AliasChange(None)  # (re)connected: whatever was published meanwhile is picked up now
            last_poll = time.monotonic()
            while not stop.is_set():
                for note in conn.notifies(timeout=_WAIT_S, stop_after=1):
                    yield AliasChange.from_payload(note.payload)
                if time.monotonic() - last_poll >= self.poll_interval:
                    last_poll = time.monotonic()
                    yield AliasChange(None)

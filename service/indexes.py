"""The aliases a service serves: one following Retriever each, opened in the background, and what the
registry says about them (versions, validation metrics, runs) for ``/v1/indexes`` and ``/readyz``.

A Retriever loads (and checksums) its alias's version before it answers anything, and keeps serving
it when a newly published version cannot be loaded; :meth:`ServedIndexes.status` reports both the
version served and the ones refused, which ``/readyz`` and ``/metrics`` show.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from registry import Registry
from retrieval import Retriever
from retrieval.errors import AliasNotFound, RetrievalError
from service.config import ServeConfig

logger = logging.getLogger(__name__)


class UnknownIndex(LookupError):
    """A request names an alias this service does not serve."""


class NotReady(RuntimeError):
    """The alias is served but its version is not loaded yet (or cannot be)."""


@dataclass(frozen=True)
class AliasStatus:
    """One served alias: the version it serves, the one the registry names, versions refused and why."""

    alias: str
    loaded: bool
    serving: str | None
    named: str | None
    refused: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def degraded(self) -> bool:
        """The registry names a version this service could not load: it serves an older one."""
        return self.named is not None and self.named != self.serving and self.named in self.refused


class ServedIndexes:
    """Opens and follows the served aliases; thread-safe.

    Args:
        config: what to serve; ``config.indexes`` empty serves every alias, also those created later.
        encoder: passed to every Retriever (``Retriever.open(encoder=...)``); None uses each version's own.
    """

    def __init__(self, config: ServeConfig, encoder: Any = None) -> None:
        self.config = config
        self._encoder = encoder
        self._retrievers: dict[str, Retriever] = {}
        self._errors: dict[str, str] = {}  # alias -> why it is not open (yet)
        self._named: dict[str, str] = {}  # alias -> the version the registry names, as last read
        self._listed: set[str] = set()  # the aliases to serve, as last listed
        self._lock = threading.Lock()
        self._registry_lock = threading.Lock()
        self._stop = threading.Event()
        self._registry = Registry.open(config.registry)  # migrates a fresh database (feedback needs 006)
        self._thread = threading.Thread(target=self._open_all, name="ragpipe-serve-open", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            retrievers, self._retrievers = list(self._retrievers.values()), {}
        for retriever in retrievers:
            retriever.close()
        with self._registry_lock:
            self._registry.close()

    # -- opening -----------------------------------------------------------------------------

    def wanted(self) -> list[str]:
        """The aliases to serve: the configured ones, else every alias in the registry."""
        if self.config.indexes:
            return list(self.config.indexes)
        return [a.alias for a in self.registry_read(lambda r: r.list_aliases())]

    def _open_all(self) -> None:
        while not self._stop.is_set():
            try:
                wanted = self.wanted()
                with self._lock:
                    self._listed = set(wanted)  # served (and awaited by /readyz) from now on
                for alias in wanted:
                    if alias not in self._retrievers and not self._stop.is_set():
                        self._open(alias)
            except Exception as exc:  # the registry is unreachable: try again at the next poll
                logger.warning("cannot list the aliases to serve: %s", exc)
            if self.config.indexes and len(self._retrievers) == len(self.config.indexes):
                return
            self._stop.wait(self.config.poll_interval)

    def _open(self, alias: str) -> None:
        try:
            retriever = Retriever.open(alias, self.config.registry.database_url, home=self.config.registry.home,
                                       encoder=self._encoder, ef=self.config.ef or None,
                                       poll_interval=self.config.poll_interval)
        except (AliasNotFound, RetrievalError, OSError) as exc:
            logger.error("cannot serve alias %s: %s", alias, exc)
            with self._lock:
                self._errors[alias] = str(exc)
            return
        with self._lock:
            self._retrievers[alias] = retriever
            self._errors.pop(alias, None)
        logger.info("serving alias %s at version %s", alias, retriever.version)

    # -- reading -----------------------------------------------------------------------------

    def retriever(self, alias: str) -> Retriever:
        """The retriever of a served alias.

        Raises:
            UnknownIndex: the alias is not served.
            NotReady: it is served but not loaded yet.
        """
        with self._lock:
            found = self._retrievers.get(alias)
            error = self._errors.get(alias)
        if found is not None:
            return found
        if alias in self._served_names():
            raise NotReady(f"index {alias!r} is not loaded yet" + (f": {error}" if error else ""))
        raise UnknownIndex(f"index {alias!r} is not served here; served: {', '.join(self._served_names()) or 'none'}")

    def _served_names(self) -> list[str]:
        with self._lock:
            opened = set(self._retrievers) | set(self._errors) | self._listed
        return sorted(opened | set(self.config.indexes))

    def default_alias(self) -> str:
        """The alias a request without ``index`` searches.

        Raises:
            UnknownIndex: several aliases are served and none is the default; the message lists them.
        """
        if self.config.default_index:
            return self.config.default_index
        if self.config.indexes:
            return self.config.indexes[0]
        names = self._served_names()
        if len(names) == 1:
            return names[0]
        import os

        env = os.environ.get("RAGPIPE_INDEX")
        if env in names:
            return env  # type: ignore[return-value]
        raise UnknownIndex(f"the request names no index and {len(names)} are served: {', '.join(names) or 'none'}")

    def status(self, refresh: bool = False) -> list[AliasStatus]:
        """Every served alias as this process serves it; ``refresh`` reads the versions the registry names."""
        if refresh:
            try:
                rows = self.registry_read(lambda r: r.list_aliases())
                with self._lock:
                    self._named = {a.alias: a.version for a in rows}
            except Exception as exc:
                logger.warning("cannot read the aliases: %s", exc)
        out = []
        with self._lock:
            retrievers, errors, named = dict(self._retrievers), dict(self._errors), dict(self._named)
        for alias in self._served_names():
            r = retrievers.get(alias)
            out.append(AliasStatus(alias=alias, loaded=r is not None, serving=r.version if r else None,
                                   named=named.get(alias), refused=r.refused if r else {}, error=errors.get(alias)))
        return out

    def ready(self) -> bool:
        """Every served alias has a loaded, checksum-verified version (and at least one alias is served)."""
        statuses = self.status()
        return bool(statuses) and all(s.loaded for s in statuses)

    def retrievers(self) -> dict[str, Retriever]:
        with self._lock:
            return dict(self._retrievers)

    def registry_read(self, query: Any) -> Any:
        """Run ``query(registry)`` on the service's registry connection (one statement at a time)."""
        with self._registry_lock:
            return self._registry.read(query, self._registry)

    def registry_write(self, action: Any) -> Any:
        with self._registry_lock:
            return action(self._registry)

    def describe(self, runs: int = 5) -> dict[str, Any]:
        """``/v1/indexes``: each served alias with its live and shadow versions, every retained version's
        status and validation metrics, and the latest runs of its index."""
        aliases = {a.alias: a for a in self.registry_read(lambda r: r.list_aliases())}
        out = []
        for status in self.status():
            row = aliases.get(status.alias)
            entry: dict[str, Any] = {**asdict(status), "degraded": status.degraded}
            if row is not None:
                entry.update(index=row.index_name, live_version=row.version, shadow_version=row.shadow_version,
                             canary_version=row.canary_version, canary_percent=row.canary_percent,
                             model_id=row.model_id, chunks=row.chunks, updated_at=row.updated_at.isoformat())
                versions = self.registry_read(lambda r: r.list_versions(row.index_name))
                entry["versions"] = [{"version": v.version, "status": v.status, "role": v.role, "chunks": v.chunks,
                                      "metrics": v.metrics, "reason": v.reason, "created_at": v.created_at.isoformat(),
                                      "published_at": v.published_at.isoformat() if v.published_at else None}
                                     for v in versions]
                listed = self.registry_read(lambda r: r.list_runs(row.index_name, runs))
                entry["runs"] = [{"run_id": x.run_id, "status": x.status, "started_at": x.started_at.isoformat(),
                                  "finished_at": x.finished_at.isoformat() if x.finished_at else None,
                                  "counts": x.counts, "error": x.error} for x in listed]
            out.append(entry)
        return {"indexes": out}

"""Following an alias: switching to the version it names on the registry's notifications, loading,
changing or ending its canary and shadow, and keeping versions that stopped serving warm.

A newly published version is loaded beside the current one and switched to with one reference
assignment; a version that cannot be loaded is not switched to (the current one keeps serving), and
a damaged one is refused for good. After every refresh the segments no held version lists are
closed, and the segment cache may evict them.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from registry.listener import AliasListener
from retrieval.errors import VersionCorrupt
from retrieval.opening import VersionOpening
from retrieval.rollout import Rollout, WarmVersions

if TYPE_CHECKING:
    from registry.rows import AliasRow
    from retrieval.caches import LRUCache, SemanticCache
    from retrieval.loaded import LoadedVersion

logger = logging.getLogger("retrieval.retriever")


class AliasFollowing(VersionOpening):
    """Following the alias; mixed into :class:`retrieval.retriever.Retriever`."""

    _refresh_lock: threading.Lock
    _closed: threading.Event
    _current: LoadedVersion
    _shadow: LoadedVersion | None
    _rollout: Rollout | None
    _warm: WarmVersions
    _refused: dict[str, str]
    _result_cache: LRUCache
    _semantic: SemanticCache | None

    def _held(self) -> list[Any]:
        rollout = self._rollout
        return [self._current, self._shadow, rollout.version if rollout else None, *self._warm.versions()]

    def _follow(self) -> None:
        """Switch to newly published versions on the registry's notifications, and re-check after
        every reconnection and poll interval. A failed re-check is retried at the next one; the
        loaded version keeps serving meanwhile."""
        listener = AliasListener(self._registry.url, poll_interval=self.config.poll_interval)
        for change in listener.changes(self._closed):
            if change.alias not in (None, self.alias):
                continue
            try:
                self.refresh()
            except Exception:  # the database went away again: the listener reconnects, then re-checks
                logger.warning("alias follower: cannot refresh alias %s; serving %s until the next check",
                               self.alias, self._current.info.version, exc_info=True)

    def refresh(self) -> bool:
        """Follow the alias: switch to its live version if it changed, and load, change or drop its
        canary; returns whether the live version switched.

        A version served before is taken from the warm ones when still there (nothing is read). A
        version that cannot be loaded is logged and not switched to: the current one keeps serving.
        A damaged one (:class:`VersionCorrupt`) is not tried again; one whose files cannot be read
        now is tried again at the next refresh.
        """
        with self._refresh_lock:
            row = self._alias_row()
            switched = False
            if row.version != self._current.info.version and row.version not in self._refused:
                loaded = self._served(row.version)
                if loaded is not None:
                    previous = self._current
                    self._current = loaded  # one assignment: queries already running keep `previous`
                    self._warm.keep(previous)
                    self._result_cache.clear()
                    switched = True
                    logger.info("alias %s switched %s -> %s", self.alias, previous.info.version, loaded.info.version)
            self._refresh_canary(row)
            self._warm.expire()
            if self._semantic is not None:
                self._semantic.retain_versions(self.serving_versions())
            self._refresh_shadow()
            self._release_segments([v for v in self._held() if v is not None])
            return switched

    def _served(self, name: str) -> LoadedVersion | None:
        """Version ``name`` to serve: the canary's or a warm one when loaded already, else read now."""
        rollout = self._rollout
        if rollout is not None and rollout.version.info.version == name:
            return rollout.version  # a promoted canary: loaded since it started
        warm = self._warm.take(name)
        if warm is not None:
            return warm
        info = self._info(name)
        assert info is not None
        return self._load_or_keep(info)

    def _refresh_canary(self, row: AliasRow) -> None:
        """Serve the alias's canary (loading it once) at its percentage, or stop serving one."""
        rollout = self._rollout
        name = row.canary_version
        if name is None or name == self._current.info.version or name in self._refused:
            if rollout is not None:
                self._rollout = None
                if rollout.version is not self._current:
                    self._warm.keep(rollout.version)  # an aborted canary can come back at once
                logger.info("alias %s: canary %s ended", self.alias, rollout.version.info.version)
            return
        percent = float(row.canary_percent or 0.0)
        if rollout is not None and rollout.version.info.version == name:
            if rollout.percent != percent:
                self._rollout = Rollout(rollout.version, percent)
            return
        try:
            loaded = self._served(name)
        except Exception:  # a canary is best effort: the live version keeps serving every request
            logger.warning("alias %s: cannot load canary %s; all requests go to %s", self.alias, name,
                           self._current.info.version, exc_info=True)
            return
        if loaded is not None:
            self._rollout = Rollout(loaded, percent)
            if rollout is not None:
                self._warm.keep(rollout.version)
            logger.info("alias %s: canary %s gets %g%% of requests", self.alias, name, percent)

    def serving_versions(self) -> set[str]:
        """The versions this retriever answers from now: the live one and the canary, if any."""
        rollout = self._rollout
        return {self._current.info.version} | ({rollout.version.info.version} if rollout else set())

    def rollout_state(self) -> dict[str, Any]:
        """What this retriever serves: live version, canary and its percentage, warm versions, loads."""
        rollout = self._rollout
        return {"alias": self.alias, "live": self._current.info.version,
                "canary": rollout.version.info.version if rollout else None,
                "canary_percent": rollout.percent if rollout else None,
                "warm": self._warm.names(), "loads": self.loads}

    def _refresh_shadow(self) -> None:
        if self.config.mirror_fraction <= 0:
            return
        try:
            shadow = self._info(self._alias_row().shadow_version)
            if shadow is None or shadow.version in self._refused:
                self._shadow = None
            elif self._shadow is None or self._shadow.info.version != shadow.version:
                try:
                    self.loads += 1
                    self._shadow = self._open_version(shadow)
                except VersionCorrupt as exc:
                    self._refused[shadow.version] = str(exc)
                    raise
        except Exception:  # mirroring is best effort: it never blocks serving the live version
            logger.warning("cannot load the shadow version of alias %s; mirroring paused", self.alias, exc_info=True)
            self._shadow = None

    @property
    def refused(self) -> dict[str, str]:
        """Versions the alias named that are not served (their files are damaged), and why."""
        return dict(self._refused)

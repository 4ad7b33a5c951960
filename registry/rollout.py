"""Gradual rollout in the registry: an alias's canary version, its guards, and serving statistics.

``start_canary`` names a version that readers route a share of requests to; ``promote_canary`` makes
it the alias's live version, ``abort_canary`` ends it (with the reason, in the alias history). Each
move notifies the ``ragpipe_alias`` channel, so every reader follows it. Serving processes write
what they measured per (alias, version, role) in batches (:meth:`RolloutStore.record_version_stats`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg.types.json import Jsonb

from registry.queries import fetch_all, fetch_one, q
from registry.rollout_stats import BUCKETS, Guard, StatsDelta, VersionStats
from registry.rows import CanaryRow, VersionStatsSums
from registry.versions import AliasError, AliasMove


class RolloutStore:
    """Canary and statistics operations; mixed into :class:`registry.Registry`."""

    conn: psycopg.Connection

    if TYPE_CHECKING:  # registry.versions.VersionStore's, beside this in registry.Registry
        def _move_alias(self, alias: str, index: str, version: str, action: str,
                        reason: str | None = None) -> AliasMove: ...

    def start_canary(self, alias: str, version: str, percent: float, guards: Sequence[Guard] = (),
                     min_queries: int = 100) -> AliasMove:
        """Route ``percent`` % of the alias's requests to ``version`` (again: change the share or guards).

        Raises:
            AliasError: the alias or version does not exist, the version belongs to another index, is
                the live one, was never published and is not the alias's shadow, or percent is out of range.
        """
        if not 0.0 <= percent <= 100.0:
            raise AliasError(f"canary percent must be within [0, 100], got {percent:g}")
        if min_queries < 1:
            raise AliasError(f"the guards' minimum query count must be positive, got {min_queries}")
        with self.conn.transaction():
            current = self.conn.execute(q("lock_alias"), {"alias": alias}).fetchone()
            if current is None:
                raise AliasError(f"alias {alias!r} does not exist")
            _, index, live, shadow = current
            target = self.conn.execute(q("lock_version"), {"version": version}).fetchone()
            if target is None:
                raise AliasError(f"version {version!r} does not exist")
            if target[1] != index:
                raise AliasError(f"version {version} belongs to index {target[1]!r}; alias {alias!r} serves {index!r}")
            if version == live:
                raise AliasError(f"version {version} is already alias {alias!r}'s live version")
            if target[2] not in ("published", "retired") and version != shadow:
                raise AliasError(f"version {version} is {target[2]}; a canary must have been published before "
                                 f"or be the alias's shadow")
            self.conn.execute(q("set_canary"), {"alias": alias, "version": version, "percent": float(percent),
                                                "guards": Jsonb([g.to_dict() for g in guards]),
                                                "min_queries": int(min_queries)})
            return self._record(alias, index, version, live, "canary",
                                f"{percent:g}% of requests" + (f"; guards {', '.join(map(str, guards))}" if guards else ""))

    def canary_of(self, alias: str) -> CanaryRow | None:
        """The alias's running canary, None when there is none."""
        return fetch_one(self.conn, "get_canary", CanaryRow, {"alias": alias})

    def promote_canary(self, alias: str) -> AliasMove:
        """Make the alias's canary its live version (the canary ends)."""
        canary = self.canary_of(alias)
        if canary is None:
            raise AliasError(f"alias {alias!r} has no canary to promote")
        with self.conn.transaction():
            self.conn.execute(q("lock_alias"), {"alias": alias})
            return self._move_alias(alias, canary.index_name, canary.canary_version, "promote")

    def abort_canary(self, alias: str, reason: str = "aborted by the operator",
                     version: str | None = None) -> AliasMove | None:
        """End the alias's canary; every request goes to the live version again.

        Args:
            version: abort only if this version is still the canary (a guard judged that canary);
                None aborts whichever canary runs.

        Returns:
            The move recorded, or None when ``version`` was given and is no longer the canary.

        Raises:
            AliasError: ``version`` is None and the alias has no canary.
        """
        with self.conn.transaction():
            row = self.conn.execute(q("lock_canary"), {"alias": alias}).fetchone()
            if row is None:
                raise AliasError(f"alias {alias!r} does not exist")
            canary = row[3]
            if canary is None or (version is not None and canary != version):
                if version is not None:
                    return None
                raise AliasError(f"alias {alias!r} has no canary to abort")
            self.conn.execute(q("clear_canary"), {"alias": alias})
            return self._record(alias, row[1], canary, row[2], "abort", reason)

    def _record(self, alias: str, index: str, version: str, live: str, action: str, reason: str) -> AliasMove:
        self.conn.execute(q("record_alias_move"), {"alias": alias, "version": version, "previous": live,
                                                   "action": action, "reason": reason})
        payload = json.dumps({"alias": alias, "index": index, "version": version, "action": action})
        self.conn.execute(q("notify_alias"), {"payload": payload})
        return AliasMove(alias, version, live, action)

    def alias_history(self, alias: str, limit: int = 20) -> list[tuple[str, str | None, str, str | None, datetime]]:
        """The alias's latest moves, newest first: (version, previous, action, reason, moved_at)."""
        rows = self.conn.execute(q("alias_history"), {"alias": alias, "limit": limit}).fetchall()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    # -- statistics ------------------------------------------------------------------------------

    def record_version_stats(self, deltas: Sequence[StatsDelta]) -> None:
        """Write what a process measured since its last write, one row per (alias, version, role)."""
        rows = [{"alias": d.alias, "version": d.version, "role": d.role, "queries": d.queries,
                 "compared": d.compared, "overlap_sum": d.overlap_sum, "latency_buckets": d.latency_buckets}
                for d in deltas if d.queries]
        if rows:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany(q("insert_version_stats"), rows)

    def version_stats(self, index: str) -> list[VersionStats]:
        """Every version's statistics per role, summed over all processes and writes."""
        return [_summary(s) for s in fetch_all(self.conn, "version_stats_of_index", VersionStatsSums, {"index": index})]

    def gc_version_stats(self, index: str) -> int:
        """Delete the statistics of the index's removed and rejected versions; returns the rows deleted."""
        with self.conn.transaction():
            return self.conn.execute(q("gc_version_stats"), {"index": index}).rowcount

    def canary_stats(self, canary: CanaryRow) -> VersionStats | None:
        """The running canary's statistics since it started (None before anything was written)."""
        sums = fetch_one(self.conn, "canary_stats", VersionStatsSums,
                         {"alias": canary.alias, "version": canary.canary_version, "since": canary.canary_started_at})
        return None if sums is None else _summary(sums)


def _summary(sums: VersionStatsSums) -> VersionStats:
    buckets = list(sums.latency_buckets or [])
    return VersionStats.from_sums(sums.version, sums.role, sums.queries, sums.compared, sums.overlap_sum,
                                  buckets + [0] * (BUCKETS - len(buckets)))


__all__ = ["RolloutStore"]

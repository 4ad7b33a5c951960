"""Version upkeep: undoing what killed runs left, and removing versions and segments beyond the retention.

``plan_gc`` decides which versions go (a pure function over the registry's listing); the callers
mark them removed in the registry before any file goes, then remove their files and the segments
no retained version lists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.segments.storage import SegmentArtifacts, SegmentCollection
from registry import Registry, VersionListing
from retrieval.artifacts import ArtifactStore
from retrieval.errors import VersionCorrupt, VersionUnavailable
from retrieval.segments.manifest import VersionManifest

logger = logging.getLogger(__name__)

RETAINED = ("published", "retired", "validated")


@dataclass(frozen=True)
class GcPlan:
    """Versions to remove, and the sequence number of the oldest one kept (None: none kept)."""

    remove: tuple[str, ...]
    oldest_kept_seq: int | None


def plan_gc(versions: Sequence[VersionListing], retention: int) -> GcPlan:
    """Keep the newest ``retention`` versions (``versions`` newest first) and always the live,
    canary, shadow and head ones; the other built versions go."""
    kept = 0
    seqs: list[int] = []
    remove: list[str] = []
    for v in versions:
        if v.status not in RETAINED:
            continue
        if v.live or v.canary or v.shadow or v.head or kept < retention:
            kept += 1
            seqs.append(v.version_seq)
        else:
            remove.append(v.version)
    return GcPlan(tuple(remove), min(seqs) if seqs else None)


def recover_unfinished(registry: Registry, store: ArtifactStore, index: str) -> list[str]:
    """Undo versions a killed run left half-done (call while holding the index lock).

    Files go first: a kill between the two steps leaves a version that is still unfinished, and the
    next run removes it again. Segments only such versions wrote go at the next gc.
    """
    store.remove_partials(index)
    recovered = []
    for unfinished in registry.unfinished_versions(index):
        version = unfinished.version
        store.remove(index, version)
        registry.abandon_version(index, version, unfinished.version_seq,
                                 "abandoned: the run building it ended before publishing")
        recovered.append(version)
        logger.warning("recovered unfinished version %s of index %s", version, index)
    return recovered


def retained_manifests(registry: Registry, files: SegmentArtifacts) -> list[VersionManifest] | None:
    """The segmented manifests of every version of the index whose files stay; None when one
    cannot be read (then no segment may be judged unreferenced)."""
    out = []
    for v in registry.list_versions(files.index):
        if v.status in ("removed", "rejected"):
            continue
        if not files.store.exists(files.index, v.version):
            continue  # still building (no manifest yet: its segments are new) or lost
        try:
            manifest = files.read_version(v.version)
        except (VersionCorrupt, VersionUnavailable, OSError) as exc:
            logger.warning("cannot read the manifest of version %s (%s); keeping every segment", v.version, exc)
            return None
        if manifest is not None:
            out.append(manifest)
    return out


def collect_garbage(registry: Registry, store: ArtifactStore, index: str, retention: int, *,
                    sweep_rows: bool = True) -> dict[str, Any]:
    """Remove the versions :func:`plan_gc` picks (registry rows first, then files), the registry rows
    no retained version contains, the serving statistics of removed and rejected versions (their
    feedback stays: it is what users said) and the segments no remaining version lists (call under
    the index lock; ``sweep_rows`` False: delete registry rows and statistics only when a version
    was removed now, as runs do; those of rejected versions then wait for ``ragpipe gc``). While a
    version is being built (an orchestrated run between its steps) no segment goes: the ones it
    wrote are listed by no manifest yet; nor while a compaction merges (its claim).

    A version is marked removed before its files are deleted, in a transaction that serializes with
    alias moves, so an alias can never be moved onto files that are going away.
    """
    versions = registry.list_versions(index)  # newest first
    plan = plan_gc(versions, retention)
    removed = registry.mark_removed(index, list(plan.remove))
    gone = set(removed) | {v.version for v in versions if v.status in ("removed", "rejected")}
    for version in sorted(gone):
        if store.exists(index, version):  # also files a killed gc or rejection left behind
            store.remove(index, version)
    rows = stats = 0
    if removed or sweep_rows:  # a run sweeps rows when versions went
        if plan.oldest_kept_seq is not None:
            rows = registry.gc_rows(index, plan.oldest_kept_seq)
        stats = registry.gc_version_stats(index)  # also what a reader wrote after an earlier gc
    segments = SegmentCollection([], [], 0)
    if not any(v.status == "building" for v in versions):
        with registry.segment_sweep(index) as free:  # not while a compaction writes merged segments
            files = SegmentArtifacts(store, index)
            manifests = retained_manifests(registry, files) if free else None
            if manifests is not None:
                segments = files.remove_unreferenced(manifests)
    return {"versions_removed": removed, "rows_removed": rows, "stats_removed": stats,
            "segments_removed": segments.segments, "deletions_removed": segments.deletions,
            "segment_bytes_removed": segments.bytes}

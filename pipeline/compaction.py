"""Compaction (``ragpipe compact``): merge the head version's segments as the tiered policy asks, as a new version.

A merge changes no chunk set: the new version lists the merged segments in place of their inputs,
each without the chunks its inputs had deleted, and the registry stages it with no change of rows.
The merges run without the index lock (they read immutable segments); the merged segments are
validated (their graphs' recall at their measured breadth, the version's live keys against the
registry's, the same BM25 hits as the version merged on a sample of queries) and the lock is taken
only to swap the manifest: if another version was published meanwhile, the merge is discarded,
never published (run compact again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline import faults
from pipeline.config import IndexConfig
from pipeline.errors import VersionRejected
from pipeline.run_state import artifact_store, version_name
from pipeline.runner import recording, start_run
from pipeline.segments.gate import segment_recall, check_segments
from pipeline.segments.merge import merge_segments, replace_merged, segment_params
from pipeline.segments.policy import SegmentStats, TieredPolicy, plan_merges
from pipeline.segments.storage import SegmentArtifacts
from pipeline.upkeep import collect_garbage
from registry import Registry
from retrieval.segments.files import read_segment_manifest
from retrieval.segments.manifest import VersionManifest
from retrieval.segments.search import SegmentedVersion, SegmentPool

logger = logging.getLogger(__name__)

HITS_SAMPLE = 20


@dataclass
class CompactReport:
    """What ``ragpipe compact`` did; ``to_dict()`` is what ``--json`` prints.

    ``status``: ``published`` (a merged version is live), ``nothing to do`` (the policy asks for no
    merge), or ``discarded`` (another version was published while merging).
    """

    index: str
    status: str
    base: str | None = None
    version: str | None = None
    segments_before: int = 0
    segments_after: int = 0
    merges: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def segment_stats(files: SegmentArtifacts, manifest: VersionManifest) -> list[SegmentStats]:
    """What the merge policy knows of each of the version's segments: live, deleted, bytes."""
    out = []
    for ref in manifest.segments:
        segment = read_segment_manifest(files.segment_path(ref.name))
        out.append(SegmentStats(ref.name, ref.live, ref.deleted, sum(info.bytes for info in segment.files.values()),
                                exact=segment.exact))
    return out


def wanted_merges(files: SegmentArtifacts, manifest: VersionManifest, policy: TieredPolicy) -> list[Any]:
    return plan_merges(segment_stats(files, manifest), policy)


def bm25_hits_agree(before: SegmentedVersion, after: SegmentedVersion, k: int = 10) -> str | None:
    """None when both versions give the same BM25 top-k on a sample of their own chunks' texts."""
    keys = before.live_keys()
    if not len(keys):
        return None
    picked = np.random.default_rng(3).choice(keys, size=min(HITS_SAMPLE, len(keys)), replace=False)
    for key in picked.tolist():
        query = " ".join(before.chunk(int(key))["text"].split()[:8])
        a, sa = before.bm25_top(query, k)
        b, sb = after.bm25_top(query, k)
        if a.tolist() != b.tolist() or not np.allclose(sa, sb, atol=1e-6):
            return f"BM25 hits for {query!r} differ between the merged and the unmerged version"
    return None


def compact_index(registry: Registry, config: IndexConfig, *, policy: TieredPolicy = TieredPolicy(),
                  before_swap: Callable[[], None] | None = None) -> CompactReport:
    """Merge the head version's segments as ``policy`` asks and publish the result.

    Args:
        before_swap: called after the merges, before the lock is taken (tests race a publish here).

    Raises:
        IndexLocked: a run held the index for ``config.lock_timeout`` seconds at the swap; the merge
            is discarded.
        VersionRejected: the merged version failed validation; the alias did not move.
    """
    started = time.perf_counter()
    store = artifact_store(config, registry.home)
    files = SegmentArtifacts(store, config.index)
    head = registry.head_version(config.index)
    base = files.read_version(head.version) if head is not None else None
    report = CompactReport(config.index, "nothing to do", base=head.version if head else None)
    if base is None:
        report.reason = "no segmented version to compact" if head is None else \
            f"version {head.version} is a whole copy; a run rebuilds it into segments first"
        return report
    report.segments_before = report.segments_after = len(base.segments)
    merges = wanted_merges(files, base, policy)
    if not merges:
        return report
    with registry.merge_claim(config.index):  # gc spares the merged segments, listed by no version yet
        pool = SegmentPool(files.local, verify=False)
        params = segment_params(base, policy.index_rows)  # a merged segment of index_rows or more gets its graph
        current, merged_names = base, []
        for merge in merges:
            inputs = [base.segment(name) for name in merge.segments]
            merged = merge_segments(pool, inputs, params, recall_target=config.min_recall)
            faults.checkpoint("merge_written")
            refs = replace_merged(current, inputs, merged, pool)
            # a merged graph is larger than each input: it needs at least the breadth they needed
            ef = max([merged.ef_search or 0, *(ref.ef or 0 for ref in inputs)]) or None
            refs = tuple(replace(r, ef=ef, recall=merged.recall_at_ef) if r.name == merged.name else r for r in refs)
            current = replace(current, segments=refs)
            merged_names.append(merged.name)
            report.merges.append({"inputs": list(merge.segments), "reason": merge.reason, "output": merged.name,
                                  "chunks": merged.rows})
        problems = [f"segment {name} at ef {ef}: HNSW recall@10 {recall:.3f} < {config.min_recall:.2f}"
                    for name in merged_names
                    for recall, ef in [segment_recall(pool.get(name), config.min_recall)] if recall < config.min_recall]
        disagreement = bm25_hits_agree(SegmentedVersion(base, pool), SegmentedVersion(current, pool))
        if disagreement:
            problems.append(disagreement)
        if before_swap is not None:
            before_swap()
        with registry.index_lock(config.index, config.lock_timeout):
            now = registry.head_version(config.index)
            if now is None or now.version != base.version:
                report.status, report.reason = "discarded", (
                    f"version {now.version if now else None} was published while merging {base.version}; "
                    f"nothing published (run compact again)")
                files.remove_segments(merged_names)
                report.seconds = round(time.perf_counter() - started, 3)
                return report
            _swap(registry, config, files, base, current, merged_names, problems, report)
            collect_garbage(registry, store, config.index, config.retention)
        report.segments_after = len(current.segments)
        report.seconds = round(time.perf_counter() - started, 3)
        return report


def _swap(registry: Registry, config: IndexConfig, files: SegmentArtifacts, base: VersionManifest,
          merged: VersionManifest, new: list[str], problems: list[str], report: CompactReport) -> None:
    """Stage, check and publish the merged version (under the index lock)."""
    state = start_run(registry, config, f"compact:{base.version}", base.model_id)
    summary = state.summary
    with recording(registry, state):
        summary.version = version = version_name(config.index)
        state.seq = seq = registry.create_version(index=config.index, version=version, parent=base.version,
                                                  run_id=summary.run_id, model_id=base.model_id, full_build=False)
        registry.stage_version(index=config.index, version=version, seq=seq, run_id=summary.run_id, chunks=[],
                               valid_from={}, rechunked_doc_ids=[], deleted_doc_ids=[])
        manifest = replace(merged, version=version, parent=base.version, run_id=summary.run_id, full_build=False,
                           created_at=datetime.now(timezone.utc).isoformat())
        uri = files.write_version(manifest)
        registry.mark_version_built(version, uri, manifest.to_dict())
        problems = problems + check_segments(files, manifest, registry.member_keys(config.index, seq),
                                             model_id=base.model_id, checksums=False, new=new)
        metrics = {"segments": len(manifest.segments), "merged_from": len(base.segments), "compaction": True}
        if problems:
            files.store.remove(config.index, version)
            registry.abandon_version(config.index, version, seq, "; ".join(problems), metrics)
            raise VersionRejected(f"version {version} rejected: {'; '.join(problems)}; alias unchanged")
        registry.mark_version_validated(version, metrics)
        faults.checkpoint("merge_validated")
        move = registry.publish(index=config.index, alias=config.alias, version=version, seq=seq,
                                run_id=summary.run_id, documents=[], chunk_counts={}, chunker_versions={},
                                valid_from={}, deleted_doc_ids=[], before_commit=lambda: faults.checkpoint("publishing"))
        summary.alias = {"alias": move.alias, "version": move.version, "previous": move.previous,
                         "action": move.action}
        summary.chunks = {"added": 0, "removed": 0, "kept": manifest.chunks,
                          "active": registry.count_active_chunks(config.index)}
    report.status, report.version = "published", version

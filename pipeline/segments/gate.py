"""Validate stage over segments: a segmented version is published only if its segments, deletion sets
and the registry agree, and every new segment's graph reaches the recall target at its recorded breadth.

Structural checks (invariants 2 and 5 of the design): every segment the manifest lists is whole
(its files' sizes, and for segments an older version wrote too, present); the live chunk keys —
each segment's keys minus its deletion set — are one set, without a key in two segments, equal to
the registry's rows for the version; the model and dimension are the manifest's; the new segments
hold no chunk of a document that is gone. Quality: each new segment's graph, read back from its
files, reaches ``min_recall`` (recall@10 against exact search on a sample of its own vectors) at
the breadth the build measured and recorded; the golden set and the query encoder as for whole copies.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.segments.storage import SegmentArtifacts
from pipeline.segments.tuning import choose_ef
from pipeline.validation import ENCODER_SAMPLE, Thresholds, ValidationReport, check_query_encoder
from retrieval.artifacts import file_problems
from retrieval.errors import VersionCorrupt
from retrieval.segments import files as f
from retrieval.segments.manifest import SegmentRef, VersionManifest
from retrieval.segments.search import SegmentedVersion, SegmentPool
from retrieval.segments.segment import Segment, sorted_contains


def live_keys(files: SegmentArtifacts, manifest: VersionManifest) -> tuple[np.ndarray, list[str]]:
    """(the version's live chunk keys ascending, problems): each segment's keys minus its deletions.

    Raises:
        VersionCorrupt: a segment's keys or a deletion file cannot be read (naming it).
    """
    parts, problems = [], []
    for ref in manifest.segments:
        path = files.segment_path(ref.name) / f.SORTED_KEYS_FILE
        try:
            keys = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise VersionCorrupt(f"segment {ref.name}: cannot read {f.SORTED_KEYS_FILE}: {exc}") from exc
        if len(keys) != ref.rows:
            problems.append(f"segment {ref.name} holds {len(keys)} chunks, the manifest says {ref.rows}")
        deleted = files.local.read_deletions(ref)
        if len(deleted) and not np.isin(deleted, keys).all():
            problems.append(f"segment {ref.name}: its deletion set names chunk keys the segment does not hold")
        parts.append(np.setdiff1d(keys, deleted, assume_unique=True) if len(deleted) else np.asarray(keys))
    merged = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    twice = merged[1:][merged[1:] == merged[:-1]]
    if len(twice):
        problems.append(f"chunk key {int(twice[0])} is live in two segments")
    return np.unique(merged), problems


@dataclass(frozen=True)
class KeyDelta:
    """What the registry says a version changed relative to its parent: the keys it added and
    removed, and so how many chunks the version holds (the parent's plus added minus removed).
    Checked instead of every key when the parent passed its checks (``parent``, its manifest): the
    live keys the version's segments gained and lost against the parent's must be those (deletion
    sets only grow and a segment is immutable, so a segment listed with the parent's deletion set
    holds the parent's live keys; ``ragpipe verify`` compares every key)."""

    added: Sequence[int]
    removed: Sequence[int]
    members: int
    parent: VersionManifest | None = None


def _sorted_keys(files: SegmentArtifacts, ref: SegmentRef) -> np.ndarray:
    path = files.segment_path(ref.name) / f.SORTED_KEYS_FILE
    try:
        return np.asarray(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as exc:
        raise VersionCorrupt(f"segment {ref.name}: cannot read {f.SORTED_KEYS_FILE}: {exc}") from exc


def changed_keys(files: SegmentArtifacts, manifest: VersionManifest,
                 parent: VersionManifest) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(live keys the version's segments gained, live keys they lost, problems), both ascending,
    against ``parent``, reading only the segments and deletion sets that differ from the parent's.

    Raises:
        VersionCorrupt: a segment's keys or a deletion file cannot be read (naming it).
    """
    before = {ref.name: ref for ref in parent.segments}
    listed = {ref.name for ref in manifest.segments}
    gained, lost, problems = [], [], []
    for ref in parent.segments:
        if ref.name not in listed:  # dropped (a merge's inputs): its live keys leave with it
            keys = _sorted_keys(files, ref)
            deleted = files.local.read_deletions(ref)
            lost.append(np.setdiff1d(keys, deleted, assume_unique=True) if len(deleted) else keys)
    for ref in manifest.segments:
        old = before.get(ref.name)
        if old is not None and old.deletions == ref.deletions:
            continue  # the parent's files: the parent's live keys
        keys = _sorted_keys(files, ref)
        if len(keys) != ref.rows:
            problems.append(f"segment {ref.name} holds {len(keys)} chunks, the manifest says {ref.rows}")
        deleted = files.local.read_deletions(ref)
        if not sorted_contains(keys, deleted).all():
            problems.append(f"segment {ref.name}: its deletion set names chunk keys the segment does not hold")
        if old is None:
            gained.append(np.setdiff1d(keys, deleted, assume_unique=True) if len(deleted) else keys)
            continue
        was = files.local.read_deletions(old)
        if not sorted_contains(deleted, was).all():
            problems.append(f"segment {ref.name}: its deletion set lacks chunk keys its parent's deleted")
        lost.append(np.setdiff1d(deleted, was, assume_unique=True))
    both = [np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (gained, lost)]
    if len(np.unique(both[0])) != len(both[0]):
        twice = np.sort(both[0])
        problems.append(f"chunk key {int(twice[1:][twice[1:] == twice[:-1]][0])} is live in two segments")
    return np.unique(both[0]), np.unique(both[1]), problems


def changed_segment_problems(files: SegmentArtifacts, manifest: VersionManifest, delta: KeyDelta) -> list[str]:
    """What the version's segments disagree with the registry's changes on, read from the segments
    and deletion sets that differ from the parent's only (see :class:`KeyDelta`)."""
    assert delta.parent is not None
    gained, lost, problems = changed_keys(files, manifest, delta.parent)
    listed = {ref.name for ref in delta.parent.segments}
    for ref in manifest.segments:  # a gained key must not be live in a segment the parent had too
        if ref.name not in listed or not len(gained):
            continue
        found = gained[sorted_contains(_sorted_keys(files, ref), gained)]
        live = found[~sorted_contains(files.local.read_deletions(ref), found)]
        if len(live):
            problems.append(f"chunk key {int(live[0])} is live in two segments (segment {ref.name} and a new one)")
    live = delta.parent.chunks + len(gained) - len(lost)
    if live != manifest.chunks:
        problems.append(f"manifest counts {manifest.chunks} live chunks, the segments hold {live}")
    if live != delta.members:
        problems.append(f"segments and registry differ: the segments hold {live} live chunks, the "
                        f"registry's changes make {delta.members}")
    added = np.setdiff1d(gained, lost, assume_unique=True)  # a rewritten chunk is lost and gained again
    removed = np.setdiff1d(lost, gained, assume_unique=True)
    expected_added, expected_removed = np.asarray(delta.added, dtype=np.int64), np.asarray(delta.removed, dtype=np.int64)
    problems += _change_problems(np.setdiff1d(expected_added, added), np.setdiff1d(expected_removed, removed))
    extra = np.setdiff1d(added, expected_added)
    if len(extra):
        problems.append(f"{len(extra)} chunks are live in the segments that the registry's changes do not add")
    gone = np.setdiff1d(removed, expected_removed)
    if len(gone):
        problems.append(f"{len(gone)} chunks left the segments that the registry's changes do not remove")
    return problems


def _change_problems(missing: np.ndarray, stale: np.ndarray) -> list[str]:
    """What a version's segments lack of the registry's additions and still hold of its removals."""
    problems = []
    if len(missing):
        problems.append(f"{len(missing)} chunks the version adds are not live in its segments (e.g. {int(missing[0])})")
    if len(stale):
        problems.append(f"{len(stale)} chunks the version removes are still live in its segments (e.g. {int(stale[0])})")
    return problems


def delta_problems(version_keys: np.ndarray, delta: KeyDelta) -> list[str]:
    """The registry's changes checked against every live key (a delta without its parent's manifest)."""
    problems = []
    if len(version_keys) != delta.members:
        problems.append(f"segments and registry differ: the segments hold {len(version_keys)} live chunks, the "
                        f"registry's changes make {delta.members}")
    return problems + _change_problems(np.setdiff1d(np.asarray(delta.added, dtype=np.int64), version_keys),
                                       np.intersect1d(np.asarray(delta.removed, dtype=np.int64), version_keys))


def key_problems(version_keys: np.ndarray, registry_keys: Collection[int]) -> list[str]:
    registry = np.unique(np.fromiter(registry_keys, dtype=np.int64, count=len(registry_keys)))
    if np.array_equal(version_keys, registry):
        return []
    only_version = len(np.setdiff1d(version_keys, registry, assume_unique=True))
    only_registry = len(np.setdiff1d(registry, version_keys, assume_unique=True))
    return [f"segments and registry differ: {only_version} keys only in the segments, {only_registry} only in the "
            f"registry"]


def check_segments(files: SegmentArtifacts, manifest: VersionManifest, registry_keys: Collection[int] | KeyDelta, *,
                   model_id: str, checksums: bool = True, new: Sequence[str] = ()) -> list[str]:
    """Structural problems of a segmented version, each naming the segment it concerns.

    ``registry_keys``: the registry's keys for the version, or (an incremental version whose
    parent passed this check) what the registry says it changed.

    ``checksums`` hashes every file of every segment (``ragpipe verify``); otherwise sizes are
    checked for the ``new`` segments (just written, their checksums just computed) and presence
    for the others (checked when they were new).
    """
    problems = []
    if manifest.model_id != model_id:
        problems.append(f"manifest names model {manifest.model_id!r}, the version was built with {model_id!r}")
    for ref in manifest.segments:
        directory = files.segment_path(ref.name)
        try:
            seg = f.read_segment_manifest(directory)
        except VersionCorrupt as exc:
            problems.append(str(exc))
            continue
        if checksums or ref.name in new:
            problems += [f"segment {ref.name}: {p}" for p in file_problems(directory, seg.file_table(), checksums=checksums)]
        for what, theirs, ours in [("model", seg.model_id, manifest.model_id), ("dimension", seg.dim, manifest.dim),
                                   ("metric", seg.metric, manifest.metric), ("rows", seg.rows, ref.rows)]:
            if theirs != ours:
                problems.append(f"segment {ref.name} has {what} {theirs!r}, the version manifest says {ours!r}")
    if problems:
        return problems
    try:
        if isinstance(registry_keys, KeyDelta) and registry_keys.parent is not None:
            return changed_segment_problems(files, manifest, registry_keys)
        keys, more = live_keys(files, manifest)
    except VersionCorrupt as exc:
        return [str(exc)]
    if len(keys) != manifest.chunks:
        more.append(f"manifest counts {manifest.chunks} live chunks, the segments hold {len(keys)}")
    if isinstance(registry_keys, KeyDelta):
        return more + delta_problems(keys, registry_keys)
    return more + key_problems(keys, registry_keys)


def segment_recall(segment: Segment, target: float) -> tuple[float, int]:
    """Recall@10 of the segment's graph, as read back from its files, at its recorded breadth (1
    for a segment without a graph: it is searched exactly)."""
    ef = segment.ef
    if segment.graph is None:
        return 1.0, ef
    choice = choose_ef(segment.graph, segment.vectors, segment.keys, target, candidates=(ef,))
    return choice.recall, ef


def validate_segmented(
    files: SegmentArtifacts, manifest: VersionManifest, new: Sequence[str], registry_keys: Collection[int] | KeyDelta, *,
    model_id: str, live_doc_ids: Collection[str], thresholds: Thresholds, golden_set: Path | None = None,
    embed: Callable[[list[str]], np.ndarray] | None = None, embed_queries: Callable[[list[str]], np.ndarray] | None = None,
    live_metrics: dict[str, Any] | None = None,
    query_encoder: Callable[[], Callable[[list[str]], np.ndarray]] | None = None,
) -> ValidationReport:
    """Every check on a freshly built segmented version whose new segments are ``new``."""
    report = ValidationReport()
    report.problems += check_segments(files, manifest, registry_keys, model_id=model_id, checksums=False, new=new)
    if report.problems:
        return report
    pool = SegmentPool(files.local, verify=False)
    recalls, efs = [], {}
    live_docs = set(live_doc_ids)
    texts: list[str] = []
    for name in new:
        try:
            segment = pool.get(name)
        except VersionCorrupt as exc:
            report.problems.append(str(exc))
            return report
        gone = set(segment.chunks.column("doc_id").to_pylist()) - live_docs
        if gone:
            report.problems.append(f"segment {name}: {len(gone)} documents that are gone still have chunks "
                                   f"(e.g. {sorted(gone)[0]!r})")
        recall, ef = segment_recall(segment, thresholds.min_recall)
        recalls.append(recall)
        efs[name] = ef
        if recall < thresholds.min_recall:
            report.problems.append(f"segment {name} at ef {ef}: HNSW recall@10 {recall:.3f} < {thresholds.min_recall:.2f}")
        if len(texts) < ENCODER_SAMPLE and segment.rows:
            rows = np.random.default_rng(2).choice(segment.rows, size=min(ENCODER_SAMPLE, segment.rows), replace=False)
            texts += [segment.chunk(int(r))["text"] for r in rows][: ENCODER_SAMPLE - len(texts)]
        del segment
        pool.retain([])  # one graph in memory at a time: a full build's segments are checked one by one
    recorded = [r.recall for r in manifest.segments if r.recall is not None]
    report.metrics["hnsw_recall_at_10"] = round(min(recalls or recorded or [1.0]), 4)
    report.metrics["ef_search"] = {ref.name: ref.ef for ref in manifest.segments}
    report.metrics["segments"] = len(manifest.segments)
    if report.problems:
        return report
    if query_encoder is not None and embed is not None and texts:
        def agreement() -> float:
            a, b = embed(texts), query_encoder()(texts)
            return float((np.asarray(a, dtype=np.float32) * np.asarray(b, dtype=np.float32)).sum(axis=1).min())
        if not check_query_encoder(report, agreement):
            return report
    if golden_set is not None and embed is not None:
        version = SegmentedVersion(manifest, pool)
        score = golden_recall(golden_set, version, embed_queries or embed, thresholds.golden_k)
        report.metrics["golden_recall"] = round(score, 4)
        if score < thresholds.golden_min_recall:
            report.problems.append(f"golden recall@{thresholds.golden_k} {score:.3f} < {thresholds.golden_min_recall:.2f}")
        live = (live_metrics or {}).get("golden_recall")
        if live is not None and score < live - thresholds.golden_max_drop:
            report.problems.append(
                f"golden recall@{thresholds.golden_k} {score:.3f} fell more than {thresholds.golden_max_drop:.2f} "
                f"below the live version's {live:.3f}")
    return report


def golden_recall(path: Path, version: SegmentedVersion, embed: Callable[[list[str]], np.ndarray], k: int) -> float:
    """Mean recall@k of expected doc ids for a JSONL golden set (``query``, ``expected_doc_ids``)."""
    import json

    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not cases:
        return 1.0
    n = min(version.size, k * 5)
    if n == 0:
        return 0.0
    vectors = embed([c["query"] for c in cases])
    total = 0.0
    for case, vector in zip(cases, vectors):
        keys, _ = version.knn(vector, n)
        docs: list[str] = []
        for key in keys.tolist():
            d = version.chunk(int(key))["doc_id"]
            if d not in docs:
                docs.append(d)
        expected = set(case["expected_doc_ids"])
        total += len(expected & set(docs[:k])) / max(1, len(expected))
    return total / len(cases)

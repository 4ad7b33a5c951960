"""``ragpipe verify``: check the design's invariants against the registry and every retained version's files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.segments.gate import check_segments
from pipeline.segments.storage import SegmentArtifacts
from pipeline.validation import check_structure
from registry import Registry
from retrieval.artifacts import CHUNKS_FILE, ArtifactStore, read_manifest
from retrieval.errors import VersionCorrupt
from retrieval.segments.manifest import VersionManifest
from retrieval.segments.search import SegmentPool


@dataclass
class VerifyReport:
    index: str
    checked: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "ok": self.ok, "checked": self.checked, "violations": self.violations}

    def render(self) -> str:
        lines = [f"index {self.index!r}: {len(self.checked)} versions checked, "
                 f"{'no violations' if self.ok else f'{len(self.violations)} violations'}"]
        lines += [f"  ok  {v}" for v in self.checked if not any(x.startswith(v) for x in self.violations)]
        lines += [f"  !!  {v}" for v in self.violations]
        return "\n".join(lines)


def verify_index(registry: Registry, store: ArtifactStore, index: str, alias: str) -> VerifyReport:
    """Check every retained version of ``index`` and the alias that serves it.

    Every problem of every version is reported: a damaged version (missing, truncated, rewritten or
    unparsable files) is a finding like any other, and checking goes on with the next one.
    """
    report = VerifyReport(index)
    versions = registry.list_versions(index)
    aliases = {a.alias: a for a in registry.list_aliases()}
    live = aliases.get(alias)
    if live is None and versions:
        report.violations.append(f"alias {alias!r} does not exist though index {index!r} has versions")
    for name in ([live.version] if live else []) + ([live.shadow_version] if live and live.shadow_version else []):
        row = registry.get_version(name)
        if row is None or row.status not in ("published", "validated", "retired"):
            report.violations.append(f"{name}: alias {alias!r} names a version that is {row and row.status}")
    head = registry.head_version(index)
    active = registry.active_chunk_ids(index)
    files = SegmentArtifacts(store, index)
    for v in versions:
        if v.status not in ("published", "retired", "validated"):
            continue
        name = v.version
        report.checked.append(name)
        if not store.exists(index, name):
            report.violations.append(f"{name}: manifest missing from {store.version_uri(index, name)}")
            continue
        keys = registry.member_keys(index, v.version_seq)
        is_head = head is not None and name == head.version
        try:
            segmented = files.read_version(name)
            if segmented is not None:
                problems = _segmented_problems(files, segmented, keys, v.model_id, active if is_head else None)
            else:
                problems = _version_problems(store.local_path(index, name), name, keys, v.model_id,
                                             active if is_head else None)
        except Exception as exc:  # whatever a damaged file makes a reader raise is a finding, not a crash
            problems = [f"cannot check its files: {type(exc).__name__}: {exc}"]
        report.violations.extend(f"{name}: {p}" for p in problems)
    deleted_with_chunks = registry.active_chunks_of_deleted_documents(index)
    if deleted_with_chunks:
        report.violations.append(f"registry: {deleted_with_chunks} active chunks belong to deleted documents")
    return report


def _version_problems(directory: Path, version: str, keys: set[int], model_id: str,
                      active: set[str] | None) -> list[str]:
    """The problems of one version's files; ``active``: the registry's active chunk ids, for the head."""
    try:
        manifest = read_manifest(directory, version)
    except VersionCorrupt as exc:
        return [str(exc).removeprefix(f"version {version}: ")]
    problems, _, _ = check_structure(directory, manifest, keys, model_id=model_id)
    if active is not None and not problems:  # the files are whole: the head's chunks must be the active ones
        ids = set(pq.read_table(directory / CHUNKS_FILE, columns=["chunk_id"]).column("chunk_id").to_pylist())
        if ids != active:
            problems.append(
                f"head version's chunks differ from the registry's active rows "
                f"({len(ids - active)} only in the version, {len(active - ids)} only active)"
            )
    return problems


def _segmented_problems(files: SegmentArtifacts, manifest: VersionManifest, keys: set[int], model_id: str,
                        active: set[str] | None) -> list[str]:
    """The problems of a segmented version: every segment's checksums, its deletion set against its
    keys, the live keys against the registry's; for the head, the live chunk ids against the active rows."""
    problems = check_segments(files, manifest, keys, model_id=model_id, checksums=True)
    if active is not None and not problems:
        pool = SegmentPool(files.local, verify=False)
        ids: set[str] = set()
        for ref in manifest.segments:
            segment = pool.get(ref.name)
            chunk_ids = segment.chunks.column("chunk_id").to_pylist()
            deleted = set(files.local.read_deletions(ref).tolist())
            ids |= {c for c, k in zip(chunk_ids, segment.keys.tolist()) if k not in deleted}
        if ids != active:
            problems.append(f"head version's chunks differ from the registry's active rows "
                            f"({len(ids - active)} only in the version, {len(active - ids)} only active)")
    return problems

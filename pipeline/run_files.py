"""Run workspaces in the artifact store: the tables an orchestrated run stages under
``ROOT/INDEX/_runs/RUN_ID/`` for its later steps, collected by ``ragpipe gc`` once the run finished.

A run's own gc step removes its workspace when it publishes, and the next run's plan step those of
earlier runs; a run that ended otherwise (failed, taken over) leaves its workspace behind until
then, for good when no run follows. :func:`finished_workspaces` picks those (a pure function over the
listing and the runs' statuses); a run still running keeps its files, whatever its age: its next
step reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.segments.storage import stored_bytes
from registry import Registry
from retrieval.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

FINISHED = frozenset({"succeeded", "failed"})


@dataclass(frozen=True)
class Workspace:
    """One run's workspace: its run id, where it is, and its bytes."""

    run_id: int
    uri: str
    bytes: int


@dataclass(frozen=True)
class RunFilesCollection:
    runs: list[int]
    bytes: int


def finished_workspaces(workspaces: Sequence[Workspace], status: Mapping[int, str | None]) -> list[Workspace]:
    """The workspaces of runs that finished (``status`` by run id; None: the registry knows no such
    run of the index, and its files stay: another registry may own them)."""
    return [w for w in workspaces if status.get(w.run_id) in FINISHED]


def run_workspaces(store: ArtifactStore, index: str) -> list[Workspace]:
    """The run workspaces of ``index`` in the store."""
    from pyarrow import fs

    root = store.run_file_uri(index, 0, "x").rsplit("/", 2)[0]
    filesystem, path = fs.FileSystem.from_uri(root) if "://" in root else (fs.LocalFileSystem(), root)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        logger.warning("cannot list the run workspaces under %s: %s", root, exc)
        return []
    out = []
    for info in infos:
        if info.type == fs.FileType.Directory and info.base_name.isdigit():
            uri = f"{root}/{info.base_name}"
            out.append(Workspace(int(info.base_name), uri, stored_bytes(uri)))
    return sorted(out, key=lambda w: w.run_id)


def collect_run_files(registry: Registry, store: ArtifactStore, index: str) -> RunFilesCollection:
    """Delete the workspaces of ``index``'s finished runs; returns their run ids and bytes."""
    workspaces = run_workspaces(store, index)
    status = {}
    for w in workspaces:
        run = registry.get_run(w.run_id)
        status[w.run_id] = None if run is None or run.index_name != index else run.status
    doomed = finished_workspaces(workspaces, status)
    for w in doomed:
        store.remove_run_files(index, w.run_id)
    if doomed:
        logger.info("removed the workspaces of %d finished runs of index %s", len(doomed), index)
    return RunFilesCollection([w.run_id for w in doomed], sum(w.bytes for w in doomed))

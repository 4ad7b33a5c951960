"""A published version's directory and files get the modes the process umask gives, so a reader
running as another user can open them (or cannot, when the umask says so)."""

import os
import stat

import pytest

from conftest import write_tree
from version_files import segment_dir
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store, run_index

pytestmark = pytest.mark.db


@pytest.mark.parametrize(("umask", "directory_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_version_files_follow_the_umask(tmp_path, registry, embedder, umask, directory_mode, file_mode):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha wings.\n", "b.txt": "Beta nozzles.\n"})
    previous = os.umask(umask)
    try:
        summary = run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    finally:
        os.umask(previous)
    directory = artifact_store(IndexConfig(), registry.home).local_path("docs", summary.version)
    assert stat.S_IMODE(directory.stat().st_mode) == directory_mode
    segment = segment_dir(registry, IndexConfig(), summary.version)
    assert stat.S_IMODE(segment.stat().st_mode) == directory_mode
    files = sorted(directory.iterdir()) + sorted(segment.iterdir())
    assert {p.name for p in files} >= {"manifest.json", "segment.json", "chunks.arrow", "vectors.npy"}  # small: no graph
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(file_mode) for p in files}

"""``ragpipe gc`` in the artifact store, on local disk and on a real S3 API (moto's server): the segments
and deletion sets no retained version lists go with their bytes counted, finished runs' workspaces
go while a running run's stay, and old embedding-cache entries nothing uses go; what retained
versions need stays and serves."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import write_tree
from pipeline import steps
from pipeline.config import IndexConfig
from pipeline.gc import collect_all
from pipeline.run_files import Workspace, finished_workspaces
from pipeline.runner import RunOptions, artifact_store, run_index
from pipeline.verify import verify_index
from retrieval import Retriever
from s3server import keys, s3_client

pytestmark = pytest.mark.db

KEY_ID, SECRET = "AKIAGC" + uuid.uuid4().hex[:8].upper(), "gc-" + uuid.uuid4().hex
CORPUS = {f"n{i}.txt": f"Note {i}: the boundary layer separated at {i} degrees in tunnel run {i}.\n" for i in range(10)}


class Store:
    """The files of the artifact store, listed the same way wherever it is: (relative key, bytes)."""

    def __init__(self, artifacts: str, client=None, bucket: str | None = None) -> None:  # type: ignore[no-untyped-def]
        self.artifacts, self.client, self.bucket = artifacts, client, bucket

    def files(self) -> dict[str, int]:
        if self.client is None:
            root = Path(self.artifacts)
            return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        out = {}
        for key in keys(self.client, self.bucket, "artifacts/"):
            if key.endswith("/"):
                continue  # a directory marker pyarrow writes
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            out[key.removeprefix("artifacts/")] = head["ContentLength"]
        return out

    def under(self, folder: str) -> dict[str, int]:
        return {k: v for k, v in self.files().items() if k.startswith(f"docs/{folder}/")}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "artifacts"))
    client = s3_client(request.getfixturevalue("s3_endpoint"), monkeypatch, KEY_ID, SECRET)
    bucket = f"gc-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/artifacts", client, bucket)


def names(files: dict[str, int], folder: str) -> set[str]:
    return {k.split("/")[2] for k in files if k.startswith(f"docs/{folder}/")}


def test_gc_removes_unreferenced_segments_and_deletion_sets_with_their_bytes(
        tmp_path, store, registry, registry_config, embedder):
    src = write_tree(tmp_path / "src", CORPUS)
    config = IndexConfig(index="docs", lock_timeout=5, artifacts=store.artifacts, retention=1)
    run_index(str(src), registry, embedder, config)
    for n in (1, 2):
        (src / "n0.txt").write_text(f"Note 0, revision {n}: the flow reattached downstream.\n")
        run_index(str(src), registry, embedder, replace(config, retention=5))
    before = store.files()
    old_segments, old_deletions = names(before, "segments"), names(before, "deletions")
    assert old_deletions  # incremental versions wrote deletion sets
    live = run_index(str(src), registry, embedder, replace(config, retention=5),
                     options=RunOptions(full=True)).version
    kept = names(store.files(), "segments") - old_segments  # a full build's segments are all new
    registry.conn.execute("UPDATE embeddings SET created_at = now() - interval '40 days'")

    report = collect_all(registry, config).to_dict()

    segments = report["segments"]
    assert set(segments["segments_removed"]) == old_segments
    assert set(segments["deletion_sets_removed"]) == old_deletions
    assert segments["count"] == len(old_segments) + len(old_deletions)
    gone = {k: v for k, v in before.items() if k.split("/")[1] in ("segments", "deletions")}
    assert segments["bytes_removed"] == sum(gone.values()) > 0
    after = store.files()
    assert names(after, "segments") == kept and names(after, "deletions") == set()
    assert len(report["versions_removed"]) == 3
    # the revisions of n0.txt no retained version holds, embedded 40 days ago
    assert report["embedding_cache"]["entries_removed"] == 2
    assert report["embedding_cache"]["bytes_removed"] == 2 * 4 * embedder.dim
    again = collect_all(registry, config).to_dict()["segments"]
    assert again == {"segments_removed": [], "deletion_sets_removed": [], "count": 0, "bytes_removed": 0}
    assert verify_index(registry, artifact_store(config, registry.home), "docs", "docs").ok
    with Retriever.open("docs", registry_config.database_url, home=tmp_path / "reader", encoder=embedder,
                        follow=False, stats_interval=0) as r:
        assert r.version == live and r.search("revision 2 reattached", k=1)[0].doc_id == "n0.txt"


def test_gc_removes_finished_runs_workspaces_and_keeps_a_running_runs(
        tmp_path, store, registry, registry_config, embedder):
    src = write_tree(tmp_path / "src", CORPUS)
    config = IndexConfig(index="docs", lock_timeout=5, artifacts=store.artifacts, embed_task_size=4)
    finished = run_index(str(src), registry, embedder, config).run_id
    (src / "n1.txt").write_text("Note 1 rewritten: the tunnel was closed.\n")
    factory = lambda c: embedder  # noqa: E731
    running = steps.plan(str(src), config, owner="airflow:gc", embedder=factory, registry_config=registry_config)
    staged = steps.stage(running["run_id"], config, embedder=factory, registry_config=registry_config)
    assert staged["batches"]
    # what a finished run left (a plan removes the workspaces of earlier runs; an index whose runs
    # stopped keeps the last ones until gc)
    table = pa.table({"x": list(range(1000))})
    artifact_store(config, registry.home).write_run_table("docs", finished, "left-behind.parquet", table)
    workspaces = store.under("_runs")
    finished_bytes = sum(v for k, v in workspaces.items() if k.startswith(f"docs/_runs/{finished}/"))
    assert finished_bytes > 0

    report = collect_all(registry, config).to_dict()

    assert report["run_files"] == {"runs_removed": [finished], "count": 1, "bytes_removed": finished_bytes}
    left = store.under("_runs")
    assert left and all(k.startswith(f"docs/_runs/{running['run_id']}/") for k in left)
    assert left == {k: v for k, v in workspaces.items() if k.startswith(f"docs/_runs/{running['run_id']}/")}
    # the running run goes on from its staged files, then its own gc step removes them
    embedded = [steps.embed(running["run_id"], uri, config, embedder=factory, registry_config=registry_config)
                for uri in staged["batches"]]
    steps.build(running["run_id"], config, embedded=embedded, embedder=factory, registry_config=registry_config)
    steps.validate(running["run_id"], config, embedder=factory, registry_config=registry_config)
    steps.publish(running["run_id"], config, registry_config=registry_config)
    steps.gc(running["run_id"], config, registry_config=registry_config)
    assert store.under("_runs") == {}


def test_only_finished_runs_workspaces_are_picked():
    spaces = [Workspace(1, "a", 10), Workspace(2, "b", 20), Workspace(3, "c", 30), Workspace(4, "d", 40)]
    picked = finished_workspaces(spaces, {1: "succeeded", 2: "running", 3: "failed", 4: None})
    assert [w.run_id for w in picked] == [1, 3]

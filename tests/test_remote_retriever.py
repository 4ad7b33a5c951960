"""Retrievers on machines that never built anything, reading versions from a real S3 API (moto's
server): the same hits as a local index, only the segments a version lacks downloaded, every
download checked before use, two serving processes following one alias, and a bounded cache that
evicts only what no loaded version uses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, write_tree
from pipeline.config import IndexConfig
from pipeline.run_state import RunOptions
from pipeline.runner import run_index
from retrieval import Retriever
from retrieval.segments.cache import CACHE_DIR, CacheEntry, SegmentCache, plan_eviction
from s3server import request_log, s3_client

pytestmark = pytest.mark.db

KEY_ID, SECRET = "AKIAREMOTE" + uuid.uuid4().hex[:8].upper(), "remote-" + uuid.uuid4().hex
QUERIES = ["wing lift at transonic speed", "heat shields during reentry", "alias rollback", "boundary layer"]
CORPUS = {
    "guide.md": "# Guide\n\nRagpipe keeps a retrieval index in step with its sources.\n\n## Rollback\n\n"
                "An alias can be rolled back to the previous version instantly.\n",
    "wings.txt": "Swept wings flutter at transonic speed; lift comes from pressure differences.\n",
    "heat.txt": "Heat shields protect capsules during reentry; the boundary layer heats up.\n",
    **{f"notes/n{i}.txt": f"Note {i} on wind tunnel run {i}: the boundary layer separated at {i} degrees.\n"
       for i in range(12)},
}


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    return s3_client(s3_endpoint, monkeypatch, KEY_ID, SECRET)


@pytest.fixture
def bucket(s3) -> str:
    name = f"remote-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def remote(tmp_path, bucket, registry, embedder):
    """Index ``docs`` published with its artifacts on S3; returns (source dir, config)."""
    src = write_tree(tmp_path / "src", CORPUS)
    config = IndexConfig(index="docs", lock_timeout=5, artifacts=f"s3://{bucket}/artifacts")
    assert run_index(str(src), registry, embedder, config).status == "succeeded"
    return src, config


def edit(src: Path, n: int) -> None:
    """Change one document and add another: an incremental run adds one segment and a deletion set."""
    (src / "wings.txt").write_text(f"Swept wings flutter; revision {n} measured lift at transonic speed.\n")
    write_tree(src, {f"new{n}.txt": f"New finding {n}: heat shields ablate during reentry.\n"})


def fresh(registry_config, embedder, home: Path, **kw):
    """A retriever with a home of its own: nothing built or downloaded there."""
    kw.setdefault("follow", False)
    kw.setdefault("stats_interval", 0)
    return Retriever.open("docs", registry_config.database_url, home=home, encoder=embedder, **kw)


def segment_reads(log, bucket: str) -> set[str]:
    """The segments whose objects were read, by name."""
    return {key.split("/")[3] for key in log.object_reads(bucket) if key.startswith("artifacts/docs/segments/")}


def cached(home: Path) -> set[str]:
    return {p.name for p in (home / "cache" / CACHE_DIR).rglob("seg-*") if p.parent.name == "segments"}


def test_a_fresh_home_serves_the_remote_version_with_the_hits_of_a_local_index(
        tmp_path, remote, registry, registry_config, embedder):
    src, _ = remote
    run_index(str(src), registry, embedder, IndexConfig(index="local", lock_timeout=5))  # the same corpus, on disk
    with fresh(registry_config, embedder, tmp_path / "reader") as r, \
            Retriever.open("local", registry_config.database_url, home=registry_config.home, encoder=embedder,
                           follow=False, stats_interval=0) as local:
        assert r._current.info.artifact_uri.startswith("s3://")
        assert set(r.segment_cache.fetched.segments) == set(r._current.segment_names) == cached(tmp_path / "reader")
        for query in QUERIES:
            ours, theirs = r.search(query, k=5), local.search(query, k=5)
            assert ours and [(h.chunk_id, h.doc_id, h.text) for h in ours] == \
                [(h.chunk_id, h.doc_id, h.text) for h in theirs]
            assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-6)


def test_an_incremental_run_downloads_only_the_new_segment_and_deletion_set(
        tmp_path, remote, bucket, registry, registry_config, embedder):
    src, config = remote
    with fresh(registry_config, embedder, tmp_path / "reader") as r:
        v1, before = r.version, set(r._current.segment_names)
        edit(src, 1)
        v2 = run_index(str(src), registry, embedder, config).version
        with request_log() as log:
            assert r.refresh() and r.version == v2
        after = set(r._current.segment_names)
        added = after - before
        assert len(added) == 1 and before <= after  # one new segment; the others are shared
        assert segment_reads(log, bucket) == added  # and only its objects were read
        fetched = r.segment_cache.fetched
        assert set(fetched.segments) == before | added
        deletions = {ref.deletions for ref in r._current.version_manifest.segments if ref.deletions}
        assert deletions and set(fetched.deletions) == deletions  # the deletion set of the edited document
        reads = set(log.object_reads(bucket))
        assert {f"artifacts/docs/deletions/{name}" for name in deletions} <= reads
        assert not any(key.startswith(f"artifacts/docs/{v1}/") for key in reads)
        hits = r.search("revision 1 measured lift", k=3)
        assert hits.version == v2 and hits[0].doc_id == "wings.txt" and "revision 1" in hits[0].text


def test_artifacts_reads_the_versions_from_a_replica_of_the_store(tmp_path, remote, s3, bucket, registry_config,
                                                                  embedder):
    from retrieval.errors import VersionUnavailable

    replica = f"replica-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=replica)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="artifacts/"):
        for obj in page.get("Contents", []):
            s3.copy_object(Bucket=replica, Key="mirror/" + obj["Key"].removeprefix("artifacts/"),
                           CopySource={"Bucket": bucket, "Key": obj["Key"]})
    with fresh(registry_config, embedder, tmp_path / "origin") as origin, request_log() as log, \
            fresh(registry_config, embedder, tmp_path / "reader", artifacts=f"s3://{replica}/mirror") as r:
        assert r._current.info.artifact_uri == f"s3://{replica}/mirror/docs/{r.version}"
        assert r.version == origin.version and segment_reads(log, bucket) == set()  # only the replica was read
        assert {k.split("/")[3] for k in log.object_reads(replica) if "/segments/" in k} == set(r._current.segment_names)
        for query in QUERIES:
            assert [h.chunk_id for h in r.search(query, k=5)] == [h.chunk_id for h in origin.search(query, k=5)]
    with pytest.raises(VersionUnavailable, match=f"s3://{replica}/elsewhere/docs/"):
        fresh(registry_config, embedder, tmp_path / "lost", artifacts=f"s3://{replica}/elsewhere")


def test_a_corrupt_segment_on_s3_is_refused_naming_it_and_the_old_version_keeps_serving(
        tmp_path, remote, s3, bucket, registry, registry_config, embedder):
    src, config = remote
    with fresh(registry_config, embedder, tmp_path / "reader") as r:
        v1, before = r.version, set(r._current.segment_names)
        edit(src, 1)
        v2 = run_index(str(src), registry, embedder, config).version
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"artifacts/docs/{v2}/manifest.json")["Body"].read())
        (bad,) = {s["name"] for s in manifest["segments"]} - before
        key = f"artifacts/docs/segments/{bad}/vectors.npy"
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[-1] ^= 0xFF  # same size, another checksum
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        assert not r.refresh()
        assert r.version == v1 and v2 in r.refused
        assert bad in r.refused[v2] and "vectors.npy" in r.refused[v2] and "checksum" in r.refused[v2]
        assert r.search(QUERIES[0], k=3).version == v1
        store = tmp_path / "reader" / "cache" / CACHE_DIR
        assert bad not in cached(tmp_path / "reader")  # complete and intact, or absent
        assert not [p for p in store.rglob("*.download")]
        assert not r.refresh() and r.version == v1  # refused for good: not downloaded again


def test_the_cache_bound_evicts_only_segments_no_loaded_version_uses(
        tmp_path, remote, registry, registry_config, embedder):
    src, config = remote
    home = tmp_path / "reader"
    with fresh(registry_config, embedder, home, segment_cache_bytes=1, warm_seconds=0) as r, \
            fresh(registry_config, embedder, home, segment_cache_bytes=1, warm_seconds=0) as other:
        v1_segments = set(r._current.segment_names)
        edit(src, 1)
        run_index(str(src), registry, embedder, config)
        v3 = run_index(str(src), registry, embedder, config, options=RunOptions(full=True)).version
        assert r.refresh() and r.version == v3
        v3_segments = set(r._current.segment_names)
        assert not v3_segments & v1_segments  # a full build writes every segment anew
        # over its bound, the cache keeps what either retriever holds: v3 here, v1 in the other one
        assert cached(home) == v1_segments | v3_segments
        other.close()
        plan = r.segment_cache.evict()
        assert {Path(e.key).name for e in plan.evict} >= v1_segments and cached(home) == v3_segments
        assert plan.over_bound  # v3 alone is over the bound, and stays
        for query in QUERIES:
            assert r.search(query, k=3).version == v3


def test_eviction_plans_least_recently_used_unheld_entries_until_within_the_bound():
    entries = [CacheEntry("a", 40, 1.0), CacheEntry("b", 30, 2.0), CacheEntry("c", 20, 3.0), CacheEntry("d", 10, 0.5)]
    assert plan_eviction(entries, set(), 100).evict == ()
    plan = plan_eviction(entries, {"d"}, 60)  # d is the oldest, but held
    assert [e.key for e in plan.evict] == ["a"] and plan.remaining_bytes == 60 and not plan.over_bound
    plan = plan_eviction(entries, {"d"}, 35)
    assert [e.key for e in plan.evict] == ["a", "b"] and plan.remaining_bytes == 30 and not plan.over_bound
    plan = plan_eviction(entries, {"d"}, 5)
    assert [e.key for e in plan.evict] == ["a", "b", "c"] and plan.remaining_bytes == 10 and plan.over_bound
    plan = plan_eviction(entries, {"a", "b", "c", "d"}, 0)
    assert plan.evict == () and plan.over_bound


def _reader(registry_config, home: Path, poll_interval: float = 0.2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "rollout_reader.py"), registry_config.database_url,
                             str(home), "docs", str(poll_interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)


def _ask(proc: subprocess.Popen, command: str) -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _ready(proc: subprocess.Popen) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the reader exited before it was ready"
    return json.loads(line)


def _quit(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            stdin = proc.stdin
            assert stdin is not None
            stdin.write("quit\n")
            stdin.flush()
            proc.wait(timeout=10)


def test_two_serving_processes_follow_the_alias_and_switch_within_two_seconds(
        tmp_path, remote, registry, registry_config, embedder):
    src, config = remote
    # polling once a minute: a switch within 2 s comes from the registry's notification
    procs = [_reader(registry_config, tmp_path / f"machine-{n}", poll_interval=60) for n in range(2)]
    try:
        v1 = [_ready(p)["live"] for p in procs]
        for round_ in (1, 2):
            edit(src, round_)
            version = run_index(str(src), registry, embedder, config).version
            swapped = next(a for a in registry.list_aliases() if a.alias == "docs")
            assert swapped.version == version
            switched: dict[int, float] = {}
            while len(switched) < 2 and time.time() - swapped.updated_at.timestamp() < 10:
                for n, proc in enumerate(procs):
                    if n not in switched and _ask(proc, "state")["live"] == version:
                        switched[n] = time.time() - swapped.updated_at.timestamp()
                time.sleep(0.02)
            assert sorted(switched) == [0, 1], f"not every process switched to {version}: {switched}"
            print(f"switched to {version} after {switched} s")
            assert all(s < 2.0 for s in switched.values()), switched
            for proc in procs:
                answer = _ask(proc, f"search k revision {round_} measured lift")
                assert answer["version"] == version
        states = [_ask(p, "state") for p in procs]
        assert states[0]["fetched"] == states[1]["fetched"]  # each machine downloaded the same segments, once
        assert len(states[0]["fetched"]) == len(set(states[0]["fetched"]))
        assert v1[0] == v1[1]
    finally:
        _quit(procs)


def test_two_processes_loading_into_one_cache_at_once_share_it_intact(tmp_path, remote, registry_config):
    home = tmp_path / "shared"
    procs = [_reader(registry_config, home) for _ in range(3)]
    try:
        states = [_ready(p) for p in procs]
        assert len({s["live"] for s in states}) == 1
        answers = [_ask(p, f"search k {QUERIES[0]}") for p in procs]
        assert answers[0]["chunks"] and all(a == answers[0] for a in answers)
        store = home / "cache" / CACHE_DIR
        assert not list(store.rglob("*.download")) and not list(store.rglob("*.evicted"))
        fetched = [_ask(p, "state")["fetched"] for p in procs]
        segments = cached(home)
        assert segments and set().union(*map(set, fetched)) == segments  # every segment downloaded, none twice kept
        leases = list((store / ".leases").glob("*.json"))
        assert len(leases) == 3
    finally:
        _quit(procs)
    assert not list((home / "cache" / CACHE_DIR / ".leases").glob("*.json"))  # each lease went with its process


def test_what_a_killed_process_left_in_the_cache_never_counts_and_goes_at_the_next_eviction(tmp_path):
    cache = SegmentCache(tmp_path / "cache", limit_bytes=0)
    segments = cache.store_root("s3://bucket/artifacts/docs") / "segments"
    whole = segments / ("seg-" + "a" * 32)
    whole.mkdir(parents=True)
    (whole / "segment.json").write_text("{}")
    (whole / "keys.npy").write_bytes(b"k" * 100)
    partial = segments / f".seg-{'b' * 32}.0123456789ab.download"  # a download killed midway
    partial.mkdir()
    (partial / "vectors.npy").write_bytes(b"v" * 1000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leases = cache.root / ".leases"
    leases.mkdir()
    (leases / f"{int(dead.stdout)}-0123456789ab.json").write_text(json.dumps([str(whole.relative_to(cache.root))]))
    assert [(e.key, e.bytes) for e in cache.entries()] == [(str(whole.relative_to(cache.root)), 102)]
    plan = cache.evict()  # the dead process's lease holds nothing any more
    assert [e.key for e in plan.evict] == [str(whole.relative_to(cache.root))] and not plan.over_bound
    assert not whole.exists() and not partial.exists() and not list(leases.iterdir())
    assert list(segments.iterdir()) == []


def test_the_cache_bound_is_read_from_the_environment(monkeypatch):
    from retrieval.config import RetrievalConfig
    from retrieval.segments.cache import DEFAULT_CACHE_BYTES

    assert RetrievalConfig.from_env().segment_cache_bytes == DEFAULT_CACHE_BYTES
    monkeypatch.setenv("RAGPIPE_SEGMENT_CACHE_BYTES", "123456789")
    assert RetrievalConfig.from_env().segment_cache_bytes == 123456789
    assert RetrievalConfig.from_env(segment_cache_bytes=5).segment_cache_bytes == 5  # a given field wins
    monkeypatch.setenv("RAGPIPE_SEGMENT_CACHE_BYTES", "20GB")
    with pytest.raises(ValueError, match="RAGPIPE_SEGMENT_CACHE_BYTES='20GB' is not a number"):
        RetrievalConfig.from_env()
    monkeypatch.setenv("RAGPIPE_SEGMENT_CACHE_BYTES", "-1")
    with pytest.raises(ValueError, match="segment_cache_bytes must not be negative"):
        RetrievalConfig.from_env()

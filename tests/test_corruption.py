"""Damaged version files: loading refuses them naming the file, a following retriever keeps serving
what it has, and `ragpipe verify` reports every problem of every version without crashing."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_tree
from pipeline.config import IndexConfig
from pipeline.runner import RunOptions, artifact_store, run_index
from retrieval import Retriever
from retrieval.artifacts import MANIFEST, sha256_file
from retrieval.errors import VersionCorrupt
from retrieval.segments.files import (CHUNKS_FILE, GRAPH_FILE, POSTING_ROWS_FILE, SEGMENT_MANIFEST, TERMS_FILE,
                                      VECTORS_FILE)
from version_files import segment_dir

pytestmark = pytest.mark.db

TOPICS = ["wing", "nozzle", "shock", "boundary layer", "heat shield", "propeller", "rotor", "flap", "inlet", "vortex"]


def reports(root, count=40, revision=0):
    return write_tree(root, {f"doc{i:02d}.txt": f"Report {i} (revision {revision}): the {TOPICS[i % len(TOPICS)]} "
                                                f"at Mach {i / 10:.1f} in tunnel {i % 7}.\n" for i in range(count)})


def publish(src, registry, embedder, exact_segment_rows=0, **options):
    """Publish ``src``; its segments get graphs (these tests damage every file a segment can have)
    unless ``exact_segment_rows`` leaves the small ones to exact search."""
    config = IndexConfig(lock_timeout=5, exact_segment_rows=exact_segment_rows)
    return run_index(str(src), registry, embedder, config, options=RunOptions(**options)).version


def version_dir(registry, version):
    return artifact_store(IndexConfig(), registry.home).local_path("docs", version)


def segment_of(registry, version):
    """The directory of the version's one segment (each revision here rewrites every report)."""
    return segment_dir(registry, IndexConfig(), version)


def flip_middle(path, count=16):
    """Invert ``count`` bytes in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def garble(path):
    path.write_text('{"format": 1, "files": {')


def open_retriever(registry_config, embedder, **kw):
    kw.setdefault("follow", False)
    return Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder, **kw)


@pytest.fixture
def live(tmp_path, registry, embedder):
    """A published version of 40 one-chunk reports: (name, the directory of its segment)."""
    version = publish(reports(tmp_path / "src"), registry, embedder)
    return version, segment_of(registry, version)


@pytest.mark.parametrize("name", [VECTORS_FILE, GRAPH_FILE, CHUNKS_FILE, POSTING_ROWS_FILE, TERMS_FILE])
def test_flipped_bytes_are_refused_naming_the_file(live, registry_config, embedder, name):
    version, directory = live
    flip_middle(directory / name)
    with pytest.raises(VersionCorrupt) as refused:
        open_retriever(registry_config, embedder)
    message = str(refused.value)
    assert version in message and name in message and "checksum" in message, message


def test_a_segment_searched_exactly_has_no_graph_and_its_vectors_are_checked(tmp_path, registry, registry_config,
                                                                            embedder):
    version = publish(reports(tmp_path / "src"), registry, embedder, exact_segment_rows=1000)
    directory = segment_of(registry, version)
    assert not (directory / GRAPH_FILE).exists()
    with open_retriever(registry_config, embedder) as r:
        assert r.search("heat shield at Mach", k=3)[0].doc_id.startswith("doc")
    flip_middle(directory / VECTORS_FILE)
    with pytest.raises(VersionCorrupt) as refused:
        open_retriever(registry_config, embedder)
    assert version in str(refused.value) and VECTORS_FILE in str(refused.value) and "checksum" in str(refused.value)


@pytest.mark.parametrize(("damage", "name", "says"), [
    (truncate, GRAPH_FILE, "bytes"), (truncate, VECTORS_FILE, "bytes"), (truncate, POSTING_ROWS_FILE, "bytes"),
    (os.remove, CHUNKS_FILE, "missing"), (garble, SEGMENT_MANIFEST, "JSON"), (garble, MANIFEST, "JSON"),
])
def test_truncated_missing_or_unparsable_files_are_refused_naming_the_file(live, registry, registry_config, embedder,
                                                                            damage, name, says):
    version, directory = live
    damage((version_dir(registry, version) if name == MANIFEST else directory) / name)
    with pytest.raises(VersionCorrupt) as refused:
        open_retriever(registry_config, embedder)
    message = str(refused.value)
    assert version in message and name in message and says in message, message


@pytest.mark.parametrize("name", [VECTORS_FILE, GRAPH_FILE, CHUNKS_FILE])
def test_an_unreadable_file_its_manifest_vouches_for_is_refused_naming_it(live, registry_config, embedder, name):
    """Checksums pass (the segment manifest was rewritten to match), the file is garbage: still a clear refusal."""
    version, directory = live
    (directory / name).write_bytes(b"not a file of this kind" * 64)
    manifest = json.loads((directory / SEGMENT_MANIFEST).read_text())
    manifest["files"][name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
    (directory / SEGMENT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VersionCorrupt) as refused:
        open_retriever(registry_config, embedder)
    message = str(refused.value)
    assert version in message and f"cannot read {name}" in message, message


def test_an_intact_version_loads_and_serves(live, registry_config, embedder):
    with open_retriever(registry_config, embedder) as r:
        assert r.version == live[0]
        assert r.search("nozzle at Mach", k=3)


def test_a_following_retriever_keeps_its_version_when_the_next_is_corrupt(tmp_path, registry, registry_config,
                                                                          embedder, caplog):
    src = reports(tmp_path / "src")
    a = publish(src, registry, embedder)
    b = publish(reports(src, revision=1), registry, embedder)
    flip_middle(segment_of(registry, b) / VECTORS_FILE)
    registry.swap_alias("docs", a)
    caplog.set_level(logging.WARNING, logger="retrieval.retriever")
    with open_retriever(registry_config, embedder, follow=True, poll_interval=0.2, result_cache_size=0) as r:
        assert r.version == a
        registry.swap_alias("docs", b)
        deadline = time.monotonic() + 20
        while not any(b in rec.getMessage() for rec in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # five more polls: the refused version is not loaded (and hashed) again
        refusals = [rec for rec in caplog.records if b in rec.getMessage()]
        assert len(refusals) == 1, [rec.getMessage() for rec in caplog.records]
        assert VECTORS_FILE in refusals[0].getMessage() and a in refusals[0].getMessage()
        assert r.version == a
        hits = r.search("nozzle at Mach", k=3)
        assert hits and {h.index_version for h in hits} == {a}

        c = publish(reports(src, revision=2), registry, embedder, full=True)  # from the registry, not from b
        deadline = time.monotonic() + 20
        while r.version != c and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.version == c
        assert {h.index_version for h in r.search("nozzle at Mach", k=3)} == {c}


def cli(args, registry_config):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=registry_config.database_url, RAGPIPE_HOME=str(registry_config.home),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_search_on_a_corrupt_version_exits_1_naming_the_file(live, registry_config):
    flip_middle(live[1] / GRAPH_FILE)
    result = cli(["search", "nozzle"], registry_config)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and GRAPH_FILE in result.stderr and live[0] in result.stderr


@pytest.mark.slow
def test_verify_reports_every_problem_of_every_version(tmp_path, registry, registry_config, embedder):
    src = reports(tmp_path / "src")
    first = publish(src, registry, embedder)
    second = publish(reports(src, revision=1), registry, embedder)
    third = publish(reports(src, revision=2), registry, embedder)
    fourth = publish(reports(src, revision=3), registry, embedder)  # live and head
    garble(version_dir(registry, first) / MANIFEST)
    truncate(segment_of(registry, second) / GRAPH_FILE)
    flip_middle(segment_of(registry, second) / TERMS_FILE)
    (version_dir(registry, third) / MANIFEST).write_text("[]")
    os.remove(segment_of(registry, fourth) / CHUNKS_FILE)
    flip_middle(segment_of(registry, fourth) / VECTORS_FILE)

    result = cli(["verify", "--json"], registry_config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["checked"]) == sorted([first, second, third, fourth])
    violations = report["violations"]

    def found(version, *words):
        return any(v.startswith(version) and all(w in v for w in words) for v in violations)

    assert found(first, MANIFEST, "JSON"), violations
    assert found(second, "segment seg-", GRAPH_FILE, "bytes"), violations
    assert found(second, "segment seg-", TERMS_FILE, "checksum"), violations
    assert found(third, MANIFEST, "object"), violations
    assert found(fourth, "segment seg-", CHUNKS_FILE, "missing"), violations
    assert found(fourth, "segment seg-", VECTORS_FILE, "checksum"), violations

    human = cli(["verify"], registry_config)
    assert human.returncode == 1 and "Traceback" not in human.stderr, human.stderr
    assert all(v in human.stdout for v in violations), human.stdout

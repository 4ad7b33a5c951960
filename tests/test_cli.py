"""The `ragpipe` command as users call it: exit codes and messages that name the problem."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_tree
from registry import Registry, RegistryConfig

pytestmark = [pytest.mark.db, pytest.mark.slow]


def ragpipe(args, database_url, home):
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_missing_source_exits_1_and_names_it(tmp_path, database_url):
    result = ragpipe(["index", str(tmp_path / "nope")], database_url, tmp_path / "home")
    assert result.returncode == 1
    assert f"source {tmp_path / 'nope'} does not exist; nothing was changed" in result.stderr


def test_locked_index_exits_75(tmp_path, database_url):
    src = write_tree(tmp_path / "src", {"a.txt": "text\n"})
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        with reg.index_lock("docs", 1):
            result = ragpipe(["index", str(src), "--lock-timeout", "0.3"], database_url, tmp_path / "home")
    assert result.returncode == 75
    assert "index 'docs' is being updated by another process" in result.stderr


def test_human_and_json_summaries(tmp_path, database_url):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha text.\n", "b.bin.txt": b"\x00\x00"})
    human = ragpipe(["index", str(src), "--index", "kb"], database_url, tmp_path / "home")
    assert human.returncode == 0, human.stderr
    assert "run 1 on index 'kb': succeeded, version kb_" in human.stdout
    assert "b.bin.txt: binary file (NUL bytes)" in human.stdout
    data = json.loads(ragpipe(["index", str(src), "--index", "kb", "--json"], database_url, tmp_path / "home").stdout)
    assert data["documents"]["unchanged"] == 1 and data["version"] is None
    assert set(data["stage_seconds"]) == {"recover", "discover", "diff"}  # nothing changed: no version built


def test_bad_index_name_is_a_usage_error(tmp_path, database_url):
    result = ragpipe(["index", str(tmp_path), "--index", "Bad Name"], database_url, tmp_path / "home")
    assert result.returncode == 1 and "index name 'Bad Name' must match" in result.stderr


def test_alias_versions_and_verify_commands(tmp_path, database_url, embedder):
    from pipeline.config import IndexConfig
    from pipeline.runner import run_index

    home = tmp_path / "home"
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha.\n", "b.md": "# B\n\nBeta.\n"})
    with Registry.open(RegistryConfig(database_url=database_url, home=home), migrate=False) as reg:
        first = run_index(str(src), reg, embedder, IndexConfig())
        (src / "b.md").write_text("# B\n\nBeta, revised.\n")
        second = run_index(str(src), reg, embedder, IndexConfig())

    listed = json.loads(ragpipe(["alias", "list", "--json"], database_url, home).stdout)
    assert [(a["alias"], a["version"]) for a in listed] == [("docs", second.version)]
    rolled = ragpipe(["alias", "rollback", "docs"], database_url, home)
    assert rolled.returncode == 0 and rolled.stdout.strip() == (
        f"alias docs: {second.version} -> {first.version} (rollback)")
    swapped = json.loads(ragpipe(["alias", "swap", "docs", second.version, "--json"], database_url, home).stdout)
    assert swapped == {"alias": "docs", "version": second.version, "previous": first.version, "action": "swap"}
    missing = ragpipe(["alias", "swap", "docs", "docs_nope"], database_url, home)
    assert missing.returncode == 1 and "version 'docs_nope' does not exist" in missing.stderr
    versions = ragpipe(["versions", "list"], database_url, home)
    assert second.version in versions.stdout and "live,head" in versions.stdout

    assert ragpipe(["verify"], database_url, home).returncode == 0
    segment = json.loads((home / "artifacts" / "docs" / first.version / "manifest.json").read_text())["segments"][0]
    vectors = home / "artifacts" / "docs" / "segments" / segment["name"] / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-8] + b"garbage!")  # the same size, another content
    broken = ragpipe(["verify"], database_url, home)
    assert broken.returncode == 1
    assert (f"!!  {first.version}: segment {segment['name']}: file vectors.npy does not match its manifest checksum"
            in broken.stdout)


def test_replay_with_the_deterministic_embedder(tmp_path, database_url):
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "base.jsonl").write_text(json.dumps({"doc_id": "a.md", "text": "# A\n\nAlpha.\n"}) + "\n")
    (replay / "changes.jsonl").write_text(
        json.dumps({"step": 1, "doc_id": "b.md", "op": "upsert", "text": "# B\n\nBeta.\n"}) + "\n")
    result = ragpipe(["replay", str(replay), "--embedder", "deterministic", "--json"], database_url, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model_id"] == "deterministic-hashing-384"
    assert (data["steps"], data["stale"], data["missing"], data["final_chunks"]) == (1, 0, 0, 2)


def test_benchmarks_run_as_their_own_module_not_a_ragpipe_command(tmp_path, database_url):
    assert ragpipe(["bench", "noop"], database_url, tmp_path / "home").returncode == 2
    usage = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=60)
    from benchmarks import BENCHMARKS
    listed = "usage: python -m benchmarks {" + ",".join(BENCHMARKS) + "}"
    assert usage.returncode == 2 and listed in usage.stderr
    assert {"noop", "publish", "query", "scale", "replay"} <= set(BENCHMARKS)


def test_gc_reports_versions_cache_entries_and_downloads_it_removed(tmp_path, database_url, embedder):
    from pipeline.config import IndexConfig
    from pipeline.runner import run_index

    home = tmp_path / "home"
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha.\n", "b.md": "# B\n\nBeta.\n"})
    config = IndexConfig(retention=2)  # the third run's own gc removes the first version
    with Registry.open(RegistryConfig(database_url=database_url, home=home), migrate=False) as reg:
        versions = [run_index(str(src), reg, embedder, config).version]
        for text in ("Beta, revised.", "Beta, revised again."):
            (src / "b.md").write_text(f"# B\n\n{text}\n")
            versions.append(run_index(str(src), reg, embedder, config).version)
        reg.conn.execute("UPDATE embeddings SET created_at = now() - interval '40 days'")
    cache = home / "cache" / "docs"
    (cache / versions[0]).mkdir(parents=True)  # a copy of the removed version downloaded here before
    (cache / versions[0] / "vectors.hnsw").write_bytes(b"x" * 100)
    (cache / f".{versions[2]}.download").mkdir()  # a download of the live version, in flight

    bad = ragpipe(["gc", "--embedding-cache-ttl", "-1"], database_url, home)
    assert bad.returncode == 1 and "embedding_cache_ttl must not be negative, got -1.0" in bad.stderr
    result = ragpipe(["gc", "--retention", "1", "--json"], database_url, home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions_removed"] == [versions[1]] and report["rows_removed"] == 1
    # the first two texts of b.md: the rows of the first went with its version, the second's now
    assert report["embedding_cache"] == {"entries_removed": 2, "bytes_removed": 2 * 4 * embedder.dim,
                                         "ttl_seconds": 2592000.0}
    assert report["download_cache"] == {"directories_removed": [str(cache / versions[0])], "bytes_removed": 100}
    assert (cache / f".{versions[2]}.download").is_dir()

    again = ragpipe(["gc", "--retention", "1"], database_url, home)
    assert again.returncode == 0 and again.stdout.splitlines() == [
        "gc of index 'docs'",
        "  versions         0 removed, 0 registry rows, 0 serving statistics rows",
        "  segments         0 removed, 0 deletion sets (0 bytes): listed by no retained version",
        "  run files        0 finished runs' workspaces removed (0 bytes)",
        "  embedding cache  0 entries removed (0 bytes of vectors): used by no retained version, older than 30 days",
        "  download cache   0 directories removed (0 bytes)",
    ]
    assert ragpipe(["verify"], database_url, home).returncode == 0

"""Versions behind an alias on a real PostgreSQL: incremental equals full, the validation gate,
verify, gc, shadow versions, staged visibility, remote artifact stores, concurrent publishers."""

import json
import threading

import pytest

from pipeline.deterministic import DeterministicEmbedder
from conftest import write_tree
from retrieval.artifacts import ArtifactStore
from version_files import chunk_rows, manifest_of, opened, segment_dir
from pipeline.config import IndexConfig
from pipeline.errors import VersionRejected
from pipeline.runner import RunOptions, artifact_store, run_index
from pipeline.verify import verify_index
from registry import AliasError, IndexLocked, Registry

pytestmark = pytest.mark.db

SECTION = "\n\n".join(f"Paragraph {i} describes wind tunnel run {i} and its drag polar." for i in range(40))


def corpus(root):
    return write_tree(root, {
        "a.md": f"# A\n\n{SECTION}\n\n## Tail\n\nEnd of A.\n",
        "b.rst": "B\n=\n\nReStructuredText about heat shields.\n",
        "c.txt": "Short note on vortex generators.\n",
    })


def run(root, registry, embedder, **kw):
    options = RunOptions(full=kw.pop("full", False), shadow=kw.pop("shadow", False))
    config = IndexConfig(index=kw.pop("index", "docs"), lock_timeout=kw.pop("lock_timeout", 5), **kw)
    return run_index(str(root), registry, embedder, config, options=options), config


def version_dir(registry, config, version):
    return artifact_store(config, registry.home).local_path(config.index, version)


def table(registry, config, version):
    rows = chunk_rows(registry, config, version)
    return {r["chunk_id"]: {k: v for k, v in r.items() if k != "chunk_key"} for r in rows}


QUERIES = ["drag polar", "ablative heat shields", "flutter page", "Paragraph seven wind tunnel", "vortex"]


def bm25_by_chunk(registry, config, version):
    """Every chunk's BM25 score for a few queries, by chunk id (collection statistics included)."""
    v = opened(registry, config, version)
    keys = v.live_keys()
    ids = [v.chunk(int(k))["chunk_id"] for k in keys]
    scores = {q: v.bm25_scores(q, keys).round(9).tolist() for q in QUERIES}
    return {chunk_id: tuple(scores[q][i] for q in QUERIES) for i, chunk_id in enumerate(ids)}, round(v.avgdl, 9)


def vectors_by_chunk(registry, config, version):
    v = opened(registry, config, version)
    keys = v.live_keys()
    matrix = v.vectors_of(keys)
    return {v.chunk(int(k))["chunk_id"]: tuple(matrix[i].round(6).tolist()) for i, k in enumerate(keys)}


def test_incremental_versions_equal_a_full_rebuild(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    first, config = run(root, registry, embedder)
    assert first.full_build and first.alias["action"] == "publish"
    (root / "a.md").write_text((root / "a.md").read_text().replace("Paragraph 7 ", "Paragraph seven "))
    (root / "c.txt").unlink()
    (root / "d.md").write_text("# D\n\nA new page on flutter.\n")
    second, _ = run(root, registry, embedder)
    assert not second.full_build and second.alias["previous"] == first.version
    (root / "b.rst").write_text("B\n=\n\nReStructuredText about ablative heat shields.\n")
    third, _ = run(root, registry, embedder)
    full, _ = run(root, registry, embedder, full=True)
    assert full.full_build and full.documents["unchanged"] == 3
    assert table(registry, config, third.version) == table(registry, config, full.version)
    assert bm25_by_chunk(registry, config, third.version) == bm25_by_chunk(registry, config, full.version)
    assert vectors_by_chunk(registry, config, third.version) == vectors_by_chunk(registry, config, full.version)
    manifest = json.loads((version_dir(registry, config, third.version) / "manifest.json").read_text())
    assert manifest["parent"] == second.version and manifest["model"]["id"] == embedder.model_id
    assert manifest["format"] == 3 and not manifest["full_build"]
    # the incremental version references its parent's segments and adds one of its own
    m2, m3 = manifest_of(registry, config, second.version), manifest_of(registry, config, third.version)
    assert set(m2.segment_names) & set(m3.segment_names)
    assert len(set(m3.segment_names) - set(m2.segment_names)) == 1
    assert any(ref.deleted for ref in m2.segments)  # c.txt's and a.md's old chunks, deleted where they were
    assert all(ref.live for ref in m3.segments)  # a segment whose chunks all left is no longer listed
    assert verify_index(registry, artifact_store(config, registry.home), "docs", "docs").ok


def test_failed_validation_rejects_and_keeps_the_alias(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    good, config = run(root, registry, embedder)
    (root / "c.txt").write_text("Changed note.\n")
    with pytest.raises(VersionRejected, match=r"HNSW recall@10 1.000 < 1.01; alias unchanged"):
        run(root, registry, embedder, min_recall=1.01)
    assert registry.list_aliases()[0].version == good.version
    rejected = [v for v in registry.list_versions("docs") if v.status == "rejected"]
    assert len(rejected) == 1 and "recall" in rejected[0].reason
    assert not artifact_store(config, registry.home).exists("docs", rejected[0].version)
    assert registry.document_states("docs")["c.txt"].content_hash != ""  # untouched: still the old text
    again, _ = run(root, registry, embedder)  # the same change, now accepted, embeds nothing new
    assert again.documents["changed"] == 1 and again.embedding["chunks_embedded"] == 0


def test_golden_set_gates_publishing(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    write_tree(root, {f"extra{i}.txt": f"Filler page {i}.\n" for i in range(12)})
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"query": "Short note on vortex generators.", "expected_doc_ids": ["c.txt"]}) + "\n")
    gate = {"golden_set": str(golden), "golden_k": 1, "golden_min_recall": 1.0}
    ok, config = run(root, registry, embedder, **gate)
    assert ok.metrics["golden_recall"] == 1.0  # hash vectors: the identical text is its own nearest neighbour
    (root / "c.txt").write_text("Completely different words.\n")
    with pytest.raises(VersionRejected, match="golden recall@1 0.000 < 1.00"):
        run(root, registry, embedder, **gate)
    # a drop below the live version's score is refused even when the floor allows it
    with pytest.raises(VersionRejected, match="fell more than 0.05 below the live version's 1.000"):
        run(root, registry, embedder, **{**gate, "golden_min_recall": 0.0})
    assert registry.list_aliases()[0].version == ok.version


def test_verify_names_altered_and_missing_files(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    summary, config = run(root, registry, embedder)
    store = artifact_store(config, registry.home)
    directory = segment_dir(registry, config, summary.version)
    with open(directory / "chunks.arrow", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    (directory / "terms.arrow").unlink()
    report = verify_index(registry, store, "docs", "docs")
    assert not report.ok
    where = f"{summary.version}: segment {directory.name}"
    assert f"{where}: file chunks.arrow does not match its manifest checksum" in report.violations
    assert f"{where}: file terms.arrow is missing" in report.violations


def test_gc_keeps_live_head_and_retention(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    names = []
    for i in range(4):
        (root / "c.txt").write_text(f"Note number {i}.\n")
        s, config = run(root, registry, embedder, retention=2)
        names.append(s.version)
    statuses = {v.version: v.status for v in registry.list_versions("docs")}
    assert [statuses[n] for n in names] == ["removed", "removed", "retired", "published"]
    store = artifact_store(config, registry.home)
    assert not store.exists("docs", names[1]) and store.exists("docs", names[2])
    seqs = {v.version: v.version_seq for v in registry.list_versions("docs")}
    # rows only the removed version held are gone from the registry
    assert registry.conn.execute(
        "SELECT count(*) FROM chunks WHERE retired_seq IS NOT NULL AND retired_seq <= %s", (seqs[names[2]],)
    ).fetchone()[0] == 0
    assert verify_index(registry, store, "docs", "docs").ok
    with pytest.raises(AliasError, match="is removed; only versions that were published can be served"):
        registry.swap_alias("docs", names[0])


def test_shadow_version_with_another_model_then_promote(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    live, config = run(root, registry, embedder)
    other = DeterministicEmbedder(dim=64)
    shadow, _ = run(root, registry, other, full=True, shadow=True)
    alias = registry.list_aliases()[0]
    assert (alias.version, alias.shadow_version) == (live.version, shadow.version)
    manifest = json.loads((version_dir(registry, config, shadow.version) / "manifest.json").read_text())
    assert manifest["model"] == {"id": "deterministic-hashing-64", "dim": 64}
    assert verify_index(registry, artifact_store(config, registry.home), "docs", "docs").ok
    move = registry.promote_shadow("docs")
    assert (move.version, move.previous) == (shadow.version, live.version)
    assert registry.list_aliases()[0].shadow_version is None
    # the head stays the last regular version: a run with the first model goes on from it
    (root / "c.txt").write_text("Changed.\n")
    after, _ = run(root, registry, embedder)
    assert not after.full_build and registry.get_version(after.version).parent_version == live.version
    # a run with the shadow's model cannot extend a version of another model: it rebuilds, and
    # embeds only the changed chunk (the shadow's vectors are in the cache)
    rebuilt, _ = run(root, registry, other)
    assert rebuilt.full_build and rebuilt.embedding["chunks_embedded"] == 1
    assert verify_index(registry, artifact_store(config, registry.home), "docs", "docs").ok


@pytest.mark.parametrize("variant", ["model", "chunk_context"])
def test_a_shadow_is_not_the_parent_of_the_next_regular_run(tmp_path, registry, embedder, variant):
    """regular run, shadow run (another model, or another chunk context), regular run: the third is
    incremental over the first (one new segment, only the changed chunks embedded); the shadow keeps
    its own chunk set, verify is clean, and gc of a replaced shadow takes its rows."""
    root = corpus(tmp_path / "src")
    live, config = run(root, registry, embedder)
    if variant == "model":
        shadow, _ = run(root, registry, DeterministicEmbedder(dim=64), full=True, shadow=True)
    else:
        shadow, _ = run(root, registry, embedder, full=True, shadow=True, chunk_context="none")
    assert shadow.full_build and registry.list_aliases()[0].shadow_version == shadow.version
    assert registry.head_version("docs").version == live.version  # the shadow is beside the lineage
    store = artifact_store(config, registry.home)
    assert verify_index(registry, store, "docs", "docs").ok
    shadow_rows = chunk_rows(registry, config, shadow.version)

    (root / "c.txt").write_text("Short note on vortex generators and their wakes.\n")
    after, _ = run(root, registry, embedder)
    assert not after.full_build and after.documents["changed"] == 1 and after.documents["unchanged"] == 2
    assert after.embedding["chunks_embedded"] == 1
    row = registry.get_version(after.version)
    assert row.parent_version == live.version and not row.full_build
    before, now = manifest_of(registry, config, live.version), manifest_of(registry, config, after.version)
    assert set(now.segment_names) - set(before.segment_names) == {now.segment_names[-1]}  # one new segment
    assert set(before.segment_names) <= set(now.segment_names)
    assert {r["doc_id"] for r in chunk_rows(registry, config, after.version)} == {"a.md", "b.rst", "c.txt"}
    assert registry.list_aliases()[0].version == after.version
    assert registry.list_aliases()[0].shadow_version == shadow.version
    assert chunk_rows(registry, config, shadow.version) == shadow_rows  # the shadow's set, as it was
    assert registry.member_count("docs", registry.get_version(shadow.version).version_seq) == len(shadow_rows)
    report = verify_index(registry, store, "docs", "docs")
    assert report.ok and shadow.version in report.checked, report.violations

    # a second shadow replaces the first; once gc removes the first, its rows go with it
    second, _ = run(root, registry, DeterministicEmbedder(dim=32), full=True, shadow=True)
    for i in range(3):
        (root / "c.txt").write_text(f"Note number {i}.\n")
        run(root, registry, embedder, retention=1)
    assert registry.get_version(shadow.version).status == "removed"
    seq = registry.get_version(shadow.version).version_seq
    assert registry.conn.execute("SELECT count(*) FROM chunks WHERE status = 'shadow' AND added_seq = %s",
                                 (seq,)).fetchone()[0] == 0
    assert registry.conn.execute("SELECT count(*) FROM shadow_excluded WHERE version_seq = %s",
                                 (seq,)).fetchone()[0] == 0
    assert registry.list_aliases()[0].shadow_version == second.version
    report = verify_index(registry, store, "docs", "docs")
    assert report.ok and second.version in report.checked, report.violations


def test_valid_from_travels_to_chunks_and_table(tmp_path, registry, embedder):
    src = tmp_path / "docs.jsonl"
    rows = [{"doc_id": "d1", "text": "Embargoed text.", "metadata": {"valid_from": "2030-01-01T00:00:00Z"}},
            {"doc_id": "d2", "text": "Public text."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, config = run(src, registry, embedder)
    t = {r["doc_id"]: r for r in table(registry, config, summary.version).values()}
    assert t["d1"]["valid_from"].year == 2030 and t["d2"]["valid_from"] is None
    assert json.loads(t["d1"]["metadata"]) == {"valid_from": "2030-01-01T00:00:00Z"}
    rows[0]["metadata"]["valid_from"] = "2029-06-01T00:00:00+00:00"  # metadata-only change
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second, _ = run(src, registry, embedder)
    assert second.documents["metadata_only"] == 1 and second.chunks["added"] == 0
    t = {r["doc_id"]: r for r in table(registry, config, second.version).values()}
    assert t["d1"]["valid_from"].year == 2029
    assert registry.conn.execute("SELECT extract(year FROM valid_from) FROM chunks WHERE doc_id = 'd1' AND status = 'active'").fetchone()[0] == 2029
    src.write_text(json.dumps({"doc_id": "d3", "text": "x", "metadata": {"valid_from": "soon"}}) + "\n"
                   + "".join(json.dumps(r) + "\n" for r in rows))
    third, _ = run(src, registry, embedder)
    assert third.skipped == [{"doc_id": "d3", "reason": "line 1: metadata.valid_from 'soon' is not an ISO 8601 timestamp"}]


def test_pyarrow_filesystem_store_round_trip(tmp_path, registry, embedder):
    remote = tmp_path / "bucket"
    store = ArtifactStore(f"file://{remote}", tmp_path / "cache")
    store._local_root = None  # take the upload/download path a remote URL takes
    with store.writing("docs", "v1") as out:
        (out / "data.bin").write_bytes(b"payload")
        (out / "manifest.json").write_text("{}")
    assert store.exists("docs", "v1") and (remote / "docs" / "v1" / "data.bin").read_bytes() == b"payload"
    local = store.local_path("docs", "v1")
    assert local.parent.parent == tmp_path / "cache" and (local / "data.bin").read_bytes() == b"payload"
    store.remove("docs", "v1")
    assert not store.exists("docs", "v1") and not local.exists()


def test_two_concurrent_runs_publish_once(tmp_path, registry_config, embedder):
    root = corpus(tmp_path / "src")
    results, errors = [], []

    def index():
        try:
            with Registry.open(registry_config, migrate=False) as reg:
                results.append(run(root, reg, embedder, lock_timeout=30)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=index) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    published = [r for r in results if r.version]
    assert len(published) == 1 and len(results) == 2
    other = next(r for r in results if not r.version)
    assert other.documents["unchanged"] == 3  # it waited, then found the work done
    with Registry.open(registry_config, migrate=False) as reg:
        assert len(reg.list_versions("docs")) == 1
        assert verify_index(reg, artifact_store(IndexConfig(), reg.home), "docs", "docs").ok


def test_second_run_gives_up_after_lock_timeout(tmp_path, registry_config, registry, embedder):
    root = corpus(tmp_path / "src")
    with Registry.open(registry_config, migrate=False) as holder, holder.index_lock("docs", 1):
        with pytest.raises(IndexLocked, match="waited 0.2 s, nothing changed"):
            run(root, registry, embedder, lock_timeout=0.2)
    assert registry.list_versions("docs") == []


def test_alias_moves_are_checked(tmp_path, registry, embedder):
    root = corpus(tmp_path / "src")
    a, _ = run(root, registry, embedder)
    b, _ = run(root, registry, embedder, index="other")
    with pytest.raises(AliasError, match=f"version {b.version} belongs to index 'other'"):
        registry.swap_alias("docs", b.version)
    first_shadow, _ = run(root, registry, DeterministicEmbedder(dim=64), full=True, shadow=True)
    second_shadow, _ = run(root, registry, DeterministicEmbedder(dim=32), full=True, shadow=True)
    assert registry.get_version(first_shadow.version).status == "retired"  # replaced, kept for rollback
    assert registry.list_aliases()[0].shadow_version == second_shadow.version
    later, _ = run(root, registry, embedder)  # a run finds nothing unfinished
    assert later.recovered == [] and registry.get_version(first_shadow.version).status == "retired"


def test_a_new_title_reindexes_exactly_its_chunks_and_incremental_equals_full(tmp_path, registry, embedder):
    """Titles are part of what chunks are indexed with: a title change re-chunks the document,
    re-embeds the chunks that carry it, and the incremental version still equals a full rebuild."""
    source = tmp_path / "docs.jsonl"

    def write(title_b):
        records = [
            {"doc_id": "a", "text": SECTION, "metadata": {"title": "Wind tunnel runs"}},
            {"doc_id": "b", "text": SECTION.replace("drag", "lift"), "metadata": {"title": title_b}},
            {"doc_id": "c", "text": "A short note without a title."},
        ]
        source.write_text("".join(json.dumps(r) + "\n" for r in records))

    write("Lift polars")
    first, config = run(source, registry, embedder)
    b_chunks = first.chunks["added"] - len([c for c in registry.active_chunks("docs") if c.doc_id != "b"])
    assert b_chunks > 1
    write("Lift polars, revised")
    second, _ = run(source, registry, embedder)
    assert second.documents["changed"] == 1  # a title change is not metadata-only
    assert second.embedding["chunks_embedded"] == b_chunks  # every chunk of b carries the new title
    full, _ = run(source, registry, embedder, full=True)
    assert table(registry, config, second.version) == table(registry, config, full.version)
    assert bm25_by_chunk(registry, config, second.version) == bm25_by_chunk(registry, config, full.version)
    assert vectors_by_chunk(registry, config, second.version) == vectors_by_chunk(registry, config, full.version)
    assert verify_index(registry, artifact_store(config, registry.home), "docs", "docs").ok

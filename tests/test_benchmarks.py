"""The benchmarks' own mechanics on small data: the peer drivers of the replay benchmark stay exact,
the scale benchmark's corpus and phases work end to end. Their figures are in docs/benchmarks.md."""

import json
import random
import re

import pytest

pytestmark = [pytest.mark.db, pytest.mark.slow]


def _paragraphs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = ("shock boundary layer wing flow pressure heat plate nozzle jet stall lift drag wave mach "
             "vortex flutter panel cone inlet").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(60, 120))) + "." for _ in range(count)]


def _write_replay(root):
    a, b, c = _paragraphs(1, 8), _paragraphs(2, 6), _paragraphs(3, 5)
    base = [{"doc_id": "a.txt", "text": "\n\n".join(a)}, {"doc_id": "b.txt", "text": "\n\n".join(b)}]
    edited = ["A new opening sentence moves every later character."] + a
    changes = [
        {"step": 1, "doc_id": "a.txt", "op": "upsert", "text": "\n\n".join(edited)},
        {"step": 2, "doc_id": "b.txt", "op": "delete"},
        {"step": 3, "doc_id": "c.txt", "op": "upsert", "text": "\n\n".join(c)},
    ]
    root.mkdir()
    (root / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    (root / "changes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changes))
    return root


def test_replay_benchmark_drives_every_tool_exactly(tmp_path, server_url):
    from benchmarks.replay import TOOLS, run
    from registry import RegistryConfig

    replay_dir = _write_replay(tmp_path / "replay")
    result = run(replay_dir, TOOLS, None, RegistryConfig(database_url=server_url, home=tmp_path / "home"))
    rows = {r["tool"]: r for r in result["results"]}
    assert len(rows) == 4
    for row in rows.values():
        assert row["steps"] == 3
        assert (row["stale_max"], row["missing_max"]) == (0, 0), row
        assert row["embeddings_base"] > 0 and row["final_chunks"] > 0
    ours = rows["ragpipe"]
    offsets = rows["LangChain index(), offsets in metadata"]
    plain = rows["LangChain index(), no offsets"]
    llama = rows["LlamaIndex IngestionPipeline, UPSERTS_AND_DELETE"]
    # the inserted sentence shifts every later chunk's offset: LangChain's hash then changes with it,
    # while ragpipe and offset-free LangChain embed only what changed (plus the new document)
    assert offsets["embeddings_replay"] > plain["embeddings_replay"]
    assert ours["chars_replay"] < offsets["chars_replay"]
    assert llama["embeddings_replay"] >= plain["embeddings_replay"]  # a changed document is re-embedded whole
    assert offsets["ragpipe_chars_ratio"] == round(ours["chars_replay"] / offsets["chars_replay"], 3)


def test_scale_benchmark_runs_its_phases(tmp_path, server_url, shared_data, monkeypatch):
    from benchmarks import scale

    monkeypatch.setenv("RAGPIPE_DATABASE_URL", server_url)
    monkeypatch.setenv("RAGPIPE_HOME", str(tmp_path / "home"))
    result = scale.run(shared_data, [1500], 0.05, 0.5, 50, tmp_path)
    (entry,) = result["sizes"]
    assert 1500 <= entry["chunks"] < 1500 + 200  # templates are added until the target is reached
    build, noop, change = entry["build"], entry["noop"], entry["change"]
    assert build["chunks"]["added"] == entry["chunks"] and build["peak_rss_mb"] > 0
    assert noop["version"] is None and noop["documents"]["unchanged"] == entry["documents"]
    assert change["documents"]["changed"] == entry["changed_documents"] >= 1
    assert 0 < change["chunks"]["added"] < entry["chunks"] // 5  # only the changed documents' chunks
    assert entry["artifact_bytes"] > 0 and build["registry_bytes"] > 0
    query = entry["query"]
    assert query["chunks"] == change["chunks"]["active"]
    assert 0.5 < query["hnsw_recall_at_10"]["200"] <= 1.0
    assert query["onnx+exact"]["single"]["p50_ms"] > 0


def test_perturbed_replicas_keep_structure_and_differ():
    from benchmarks.scale import perturb

    text = "Title\n=====\n\nSome prose words that will be changed here and there.\n\n::\n\n    code stays"
    vocab = ["alpha", "beta", "gamma"]
    out = perturb(text, random.Random(1), vocab)
    assert out.startswith("Title\n=====\n\n") and out.endswith("::\n\n    code stays")
    assert out != text and len(out.split("\n\n")) == len(text.split("\n\n"))
    assert out == perturb(text, random.Random(1), vocab)  # reproducible


def test_checksums_benchmark_times_loading_with_and_without(tmp_path, server_url, shared_data):
    from benchmarks.checksums import run
    from registry import RegistryConfig

    result = run(shared_data, 300, RegistryConfig(database_url=server_url, home=tmp_path / "home"), 1, 0.001)
    version = result["version"]
    assert result["chunks"] == 300 and version["bytes"] == sum(version["files"].values())
    assert version["load_with_checksums_seconds"] > 0 and version["load_without_checksums_seconds"] > 0
    assert abs(result["synthetic"]["bytes"] - 1_000_000) < 10


def test_segments_benchmark_compares_layouts_changes_and_memory(capsys):
    from benchmarks.segments import main

    assert main(["--chunks", "3000", "--segments", "4", "--queries", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    one, many = result["layouts"]["one_1"], result["layouts"]["many_4"]
    assert [s["rows"] for s in one["segments"]] == [3000] and len(many["segments"]) == 4
    for layout in (one, many):
        change = layout["change"]
        assert change["chunks_deleted"] == change["chunks_added"] == 30
        assert change["bytes_added"] < layout["whole_copy_bytes"] / 10
        assert all(s["ef"] and s["recall_at_ef"] >= result["min_recall"] for s in layout["segments"])
    assert len(result["queries"]) == 4
    memory = result["memory"]
    shared = memory["many: two adjacent versions, shared segments"]["anon_mb"]
    separate = memory["many: two versions loaded separately (as whole copies)"]["anon_mb"]
    assert shared < separate


def test_remote_benchmark_times_a_cold_a_warm_retriever_and_a_change(capsys, monkeypatch, shared_data):
    from benchmarks.remote import main

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(name, "")  # the benchmark points them at its own server: restored afterwards
    assert main(["--chunks", "1500"]) == 0
    result = json.loads(capsys.readouterr().out)
    cold, warm, change = result["cold"], result["warm"], result["change"]
    assert cold["chunks"] == result["chunks"] >= 1500 and cold["hits"] == 10
    assert cold["segments_downloaded"] == cold["segments"] >= 1
    assert 0.9 * result["artifact_store_bytes"] < cold["bytes_downloaded"] <= result["artifact_store_bytes"]
    assert warm["bytes_downloaded"] == 0 and warm["version"] == cold["version"]
    assert change["switched"] and change["version"] != cold["version"]
    assert change["segments_downloaded"] == 1 and 0 < change["bytes_downloaded"] < cold["bytes_downloaded"] / 5


@pytest.mark.db
@pytest.mark.slow
def test_serve_benchmark_runs_its_phases_on_a_small_index(server_url, shared_data, monkeypatch):
    pytest.importorskip("fastapi", reason="needs ragpipe[serve]")
    import argparse

    from benchmarks import serve

    monkeypatch.setenv("RAGPIPE_DATABASE_URL", server_url)
    args = argparse.Namespace(chunks=300, clients=4, seconds=2.0, burst=16, rounds=1, search_threads=2,
                              load_queue_wait_ms=50.0, deadline_s=60.0)
    out = serve.run(shared_data, args)
    assert out["burst"]["statuses"] == {"200": 16} and out["burst"]["encoder_alone_one_batch_s"] > 0
    assert out["single"]["queries"] == 200 and out["single"]["library_p50_ms"] > 0
    load = out["load"]
    assert load["answered_200"] > 0 and load["unanswered"] == 0 and load["failed"] == {}
    assert load["mixed_versions"] == 0 and load["alias_swaps"] >= 1


def test_stability_benchmark_counts_recut_chunks_around_an_edit():
    from benchmarks.stability import Edit, inserted_span, measure, new_and_recut, render

    before = "Alpha one.\n\nBeta two.\n\nGamma three.\n"
    after = "Alpha one.\n\nNew text here.\n\nBeta two.\n\nGamma three.\n"
    assert after[slice(*inserted_span(before, after))] == "New text here.\n\n"
    split = lambda text: [p.strip() for p in text.split("\n\n") if p.strip()]  # noqa: E731 - one chunk a paragraph
    assert new_and_recut(before, after, split(before), split(after)) == (1, 0)  # only inserted text is new
    merged = lambda text: ["\n\n".join(split(text)[:2]), *split(text)[2:]]  # noqa: E731 - joins the first two
    assert new_and_recut(before, after, merged(before), merged(after)) == (2, 2)  # both hold old text
    corpus = [_paragraphs(4, 6), _paragraphs(5, 6)]
    edits = [Edit("sentence_added", 0, render(corpus[0]), render(corpus[0][:2] + ["Wing."] + corpus[0][2:])),
             Edit("paragraph_deleted", 1, render(corpus[1]), render(corpus[1][1:])),
             Edit("paragraph_inserted", 1, render(corpus[1]), render(corpus[1] + corpus[0][:1]))]
    result = measure(split, corpus, edits)
    kinds = result["kinds"]
    assert result["chunks"] == 12 and result["new_max"] == 1 and result["recut_max"] <= 1
    assert kinds["paragraph_deleted"]["new"]["max"] == 0 and kinds["paragraph_inserted"]["new"]["max"] == 1


def test_kept_retrieval_sets_are_what_the_peps_give(tmp_path, shared_data):
    from benchmarks.evalsets import build
    from pipeline.evaluation import load_beir

    summary = build(shared_data, tmp_path)  # raises when the kept queries differ from the derived ones
    headings = load_beir(tmp_path / "peps-headings")
    assert summary["peps-headings"]["documents"] == len(headings[0]) and len(headings[1]) > 100
    assert all(len(re.findall(r"[A-Za-z]+", q)) >= 3 for q in headings[1].values())  # a section title each
    assert summary["peps-abstracts"]["queries"] == len(load_beir(tmp_path / "peps-abstracts")[1])

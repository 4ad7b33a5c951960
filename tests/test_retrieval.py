"""The retrieval library against real published versions: attribution, hybrid stages, filters, model
lock, following the alias, caches, tracing, and many threads through alias swaps."""

import json
import random
import sys
import threading
from collections import Counter
import time
from datetime import datetime, timezone

import pytest

from pipeline.deterministic import DeterministicEmbedder
from conftest import run_threads, write_tree
from version_files import chunk_rows
from pipeline.config import IndexConfig
from pipeline.runner import RunOptions, run_index
from retrieval import Retriever
from retrieval.errors import AliasNotFound, ModelMismatch

pytestmark = pytest.mark.db

GUIDE = """# Guide

Ragpipe keeps a retrieval index in step with its sources.

## Deletes

When a document disappears from the source, its chunks are marked deleted and leave the next version.

## Rollback

An alias can be rolled back to the previous version instantly.
"""


def publish(root, registry, embedder, **kw):
    return run_index(str(root), registry, embedder, IndexConfig(lock_timeout=5, **kw))


@pytest.fixture
def corpus(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {
        "guide.md": GUIDE,
        "faq/wings.txt": "Wings generate lift from pressure differences.\n",
        "faq/heat.txt": "Heat shields protect capsules during reentry.\n",
    })
    publish(root, registry, embedder)
    return root


def open_retriever(registry_config, embedder, **kw):
    kw.setdefault("follow", False)
    return Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder, **kw)


def test_hits_carry_full_attribution(corpus, registry_config, embedder):
    with open_retriever(registry_config, embedder) as r:
        hits = r.search("chunks are marked deleted when a document disappears", k=3)
        assert hits and hits[0].doc_id == "guide.md"
        top = hits[0]
        source = (corpus / "guide.md").read_text()
        assert source[top.char_start : top.char_end] == top.text
        assert top.index_version == r.version and top.alias == "docs"
        assert top.model_id == embedder.model_id and top.version_updated_at is not None
        assert top.bm25.rank == 1 and top.vector.score is not None and top.fused.rank == 1 and top.rerank.rank == 1
        assert top.source_uri.endswith("/guide.md")
        data = json.loads(json.dumps(top.to_dict()))
        assert data["heading_path"] == list(top.heading_path) and data["score"] == top.score
        weak = r.search("zzzz unknown words", k=3)
        assert all(h.bm25.score is None and h.bm25.rank is None for h in weak)  # absent stage: None, not 0


def test_filters_overfetch_and_say_when_exhausted(tmp_path, registry, registry_config, embedder):
    rows = [{"doc_id": f"kb/{i:02d}", "text": f"Article {i} about wind tunnels.", "metadata": {"lang": "de" if i % 5 else "en"}}
            for i in range(40)]
    rows.append({"doc_id": "news/1", "text": "Article about wind tunnels, embargoed.",
                 "metadata": {"lang": "en", "valid_from": "2099-01-01T00:00:00Z"}})
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish(src, registry, embedder)
    with open_retriever(registry_config, embedder, candidates=5) as r:
        english = r.search("wind tunnels", k=8, filters={"metadata": {"lang": "en"}})
        assert len(english) == 8 and not english.exhausted  # found by looking past the first 5 candidates
        assert {h.metadata["lang"] for h in english} == {"en"} and "news/1" not in {h.doc_id for h in english}
        more = r.search("wind tunnels", k=10, filters={"metadata": {"lang": "en"}})
        assert len(more) == 8 and more.exhausted  # only 8 English articles are visible: said, not hidden
        later = r.search("wind tunnels", k=50, filters={"as_of": datetime(2100, 1, 1, tzinfo=timezone.utc)})
        assert "news/1" in {h.doc_id for h in later}
        both = r.search("wind tunnels", k=3, filters={"metadata": {"lang": ["en", "de"]}, "doc_id_prefix": "kb/1"})
        assert len(both) == 3 and not both.exhausted and all(h.doc_id.startswith("kb/1") for h in both)


def test_model_lock(corpus, registry_config, embedder):
    with pytest.raises(ModelMismatch, match="was embedded with 'deterministic-hashing-384'"):
        open_retriever(registry_config, DeterministicEmbedder(dim=64))
    with pytest.raises(AliasNotFound, match="alias 'nope' does not exist"):
        Retriever.open("nope", registry_config.database_url, home=registry_config.home, encoder=embedder,
                       follow=False)


def test_search_many_matches_search(corpus, registry_config, embedder):
    queries = ["lift from wings", "heat shields", "rollback of an alias"]
    with open_retriever(registry_config, embedder, result_cache_size=0) as r:
        many = r.search_many(queries, k=2)
        single = [r.search(q, k=2) for q in queries]
    assert [[h.chunk_id for h in hits] for hits in many] == [[h.chunk_id for h in hits] for hits in single]


def test_follows_the_alias_and_drops_caches(corpus, registry, registry_config, embedder):
    with open_retriever(registry_config, embedder, follow=True, poll_interval=30) as r:
        first = r.version
        cached = r.search("heat shields", k=1)
        again = r.search("heat shields", k=1)
        assert cached.cache is None and again.cache == "exact" and again == cached  # result cache
        (corpus / "faq" / "heat.txt").write_text("Ablative heat shields char and erode during reentry.\n")
        second = publish(corpus, registry, embedder).version
        deadline = time.monotonic() + 10
        while r.version == first and time.monotonic() < deadline:  # NOTIFY, not the 30 s poll
            time.sleep(0.05)
        assert r.version == second
        fresh = r.search("heat shields", k=1)
        assert fresh.cache is None and fresh.version == fresh[0].index_version == second and "Ablative" in fresh[0].text


def test_eight_threads_through_twenty_swaps(corpus, registry, registry_config, embedder):
    (corpus / "faq" / "wings.txt").write_text("Swept wings delay compressibility drag.\n")
    second = publish(corpus, registry, embedder).version
    first = [v.version for v in registry.list_versions("docs")][-1]
    errors, mixed, served = [], [], set()
    stop = threading.Event()
    with open_retriever(registry_config, embedder, follow=True, poll_interval=0.2, result_cache_size=0) as r:
        def query():
            while not stop.is_set():
                try:
                    hits = r.search("wings and drag", k=4)
                    versions = {h.index_version for h in hits}
                    served.update(versions)
                    if len(versions) != 1:
                        mixed.append(versions)
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

        threads = [threading.Thread(target=query) for _ in range(8)]
        for t in threads:
            t.start()
        for i in range(20):
            registry.swap_alias("docs", first if i % 2 == 0 else second)
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and mixed == []
    assert served == {first, second}


def test_tracing_spans_and_events(corpus, registry_config, embedder):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    original = trace.get_tracer
    trace.get_tracer = lambda *a, **k: provider.get_tracer(*a, **k)  # no global provider swap between tests
    try:
        with open_retriever(registry_config, embedder) as r, tracer.start_as_current_span("app"):
            hits = r.search("heat shields", k=2)
    finally:
        trace.get_tracer = original
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"retrieval.search", "embedding.query", "retrieval.vector_search", "retrieval.bm25_search",
            "retrieval.fusion", "retrieval.rerank"} <= set(spans)
    root = spans["retrieval.search"]
    assert root.attributes["retrieval.index_version"] == hits[0].index_version
    assert root.attributes["retrieval.alias"] == "docs" and root.attributes["retrieval.index_updated_at"]
    for child in ("embedding.query", "retrieval.vector_search", "retrieval.bm25_search", "retrieval.fusion",
                  "retrieval.rerank"):
        assert spans[child].parent.span_id == root.context.span_id
    events = [e for e in root.events if e.name == "chunk_retrieved"]
    assert [e.attributes["chunk_id"] for e in events] == [h.chunk_id for h in hits]
    assert events[0].attributes["source"] == hits[0].source_uri


def test_mirror_mode_measures_the_shadow_and_serves_the_primary(corpus, registry, registry_config, embedder):
    other = DeterministicEmbedder(dim=64)
    shadow = run_index(str(corpus), registry, other, IndexConfig(lock_timeout=5),
                       options=RunOptions(full=True, shadow=True))
    with open_retriever(registry_config, [embedder, other], mirror_fraction=1.0, result_cache_size=0) as r:
        r.refresh()  # loads the shadow
        hits = r.search("heat shields protect capsules", k=3)
        assert {h.index_version for h in hits} == {r.version} and r.version != shadow.version
        stats = r.mirror.summary()
        r.write_stats()  # what the stats thread does every stats_interval
    assert stats["queries"] == 1 and 0.0 <= stats["mean_overlap_at_10"] <= 1.0 and stats["shadow_p50_ms"] > 0
    written = {(s.version, s.role): s for s in registry.version_stats("docs")}
    mirrored = written[(shadow.version, "shadow")]
    assert mirrored.queries == mirrored.compared == 1
    assert mirrored.overlap_at_10 == pytest.approx(stats["mean_overlap_at_10"])
    assert written[(r.version, "live")].queries == 1


def test_mirror_statistics_stay_bounded_under_concurrent_queries(corpus, registry, registry_config, embedder):
    other = DeterministicEmbedder(dim=64)
    run_index(str(corpus), registry, other, IndexConfig(lock_timeout=5), options=RunOptions(full=True, shadow=True))
    queries = ["heat shields protect capsules", "lift from wings", "rollback of an alias", "deleted documents"]
    with open_retriever(registry_config, [embedder, other], mirror_fraction=1.0, mirror_window=25,
                        result_cache_size=0) as r:
        r.refresh()  # loads the shadow

        def search(n):
            for i in range(30):
                r.search(queries[(n + i) % len(queries)], k=3)

        assert run_threads(search, [(n,) for n in range(8)]) == []
        stats = r.mirror.summary()
    assert stats["queries"] == 240 and stats["latency_window"] == 25
    assert 0.0 <= stats["mean_overlap_at_10"] <= 1.0 and stats["primary_p50_ms"] > 0 and stats["shadow_p50_ms"] > 0


def test_staged_chunks_appear_when_their_time_comes(tmp_path, registry, registry_config, embedder):
    from datetime import timedelta

    soon = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat()
    rows = [{"doc_id": "now", "text": "Press release about the new wind tunnel."},
            {"doc_id": "later", "text": "Embargoed press release about the new wind tunnel.",
             "metadata": {"valid_from": soon}}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish(src, registry, embedder)
    with open_retriever(registry_config, embedder) as r:  # result cache on
        assert {h.doc_id for h in r.search("press release wind tunnel", k=5)} == {"now"}
        time.sleep(2.5)
        assert {h.doc_id for h in r.search("press release wind tunnel", k=5)} == {"now", "later"}
        naive = r.search("press release wind tunnel", k=5, filters={"as_of": "2000-01-01T00:00:00"})
        assert {h.doc_id for h in naive} == {"now"}


class _ShortGraph:
    """An HNSW index that, like hnswlib when its graph yields fewer than k live neighbours, raises."""

    def __init__(self, inner):
        self.inner = inner

    def set_ef(self, ef):
        self.inner.set_ef(ef)

    def knn_query(self, vectors, k, filter=None):
        raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")


def test_search_many_searches_exactly_when_the_graph_returns_too_few(corpus, registry, registry_config, embedder):
    from pipeline.runner import RunOptions

    # segments this small are searched exactly unless the index gives every segment a graph
    run_index(str(corpus), registry, embedder, IndexConfig(lock_timeout=5, exact_segment_rows=0),
              options=RunOptions(full=True))
    queries = ["chunks are marked deleted", "rolled back instantly", "heat shields", "lift from pressure"]
    with open_retriever(registry_config, embedder, candidates=2, result_cache_size=0) as r:
        expected = [[(h.chunk_id, round(h.score, 5)) for h in r.search(q, k=2)] for q in queries]
        assert all(part.segment.graph is not None for part in r._current.segmented.parts)
        for part in r._current.segmented.parts:
            part.segment.graph = _ShortGraph(part.segment.graph)
        got = [[(h.chunk_id, round(h.score, 5)) for h in hits] for hits in r.search_many(queries, k=2)]
        single = [[(h.chunk_id, round(h.score, 5)) for h in r.search(q, k=2)] for q in queries]
    assert got == single  # the batch falls back query by query, as a single search does
    assert [g[0] for g in got] == [e[0] for e in expected]  # exact search finds what the graph found


def _publish_random_corpus(tmp_path, registry, embedder, n=1500, seed=7):
    """n short documents of words drawn from a small vocabulary: HNSW at a small ef misses neighbours."""
    rng = random.Random(seed)
    vocab = [f"term{i}" for i in range(300)]
    rows = [{"doc_id": f"d/{i:04d}", "text": " ".join(rng.choice(vocab) for _ in range(12)) + "."} for i in range(n)]
    src = tmp_path / "random.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish(src, registry, embedder)
    return [" ".join(rng.choice(vocab) for _ in range(4)) for _ in range(12)]


def _hit_keys(hits):
    return [(h.chunk_id, h.vector.rank, h.vector.score, h.bm25.rank, h.fused.rank, h.rerank.rank) for h in hits]


def test_threads_searching_at_different_depths_get_single_threaded_results(tmp_path, registry, registry_config,
                                                                         embedder):
    # hnswlib keeps ef on the index, shared by every thread; a query that looks deeper (a larger k, or
    # a filter that makes the retriever fetch 4x more candidates) needs a larger breadth than others
    queries = _publish_random_corpus(tmp_path, registry, embedder)
    requests = [(q, k, f) for q in queries for k, f in [(3, None), (150, None), (3, {"doc_id_prefix": "d/00"})]]
    with open_retriever(registry_config, embedder, ef=8, candidates=8, result_cache_size=0) as r:
        expected = {i: _hit_keys(r.search(q, k, f)) for i, (q, k, f) in enumerate(requests)}
        expected_many = [_hit_keys(h) for h in r.search_many(queries, k=3)]
        assert len({tuple(expected[i]) for i in range(0, len(requests), 3)}) > 1
        wrong = []

        def worker(seed):
            order = list(range(len(requests))) * 6
            random.Random(seed).shuffle(order)
            for n, i in enumerate(order):
                q, k, f = requests[i]
                if _hit_keys(r.search(q, k, f)) != expected[i]:
                    wrong.append((q, k, f))
                if n % 10 == 0 and [_hit_keys(h) for h in r.search_many(queries, k=3)] != expected_many:
                    wrong.append(("search_many", 3, None))

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads often: between setting ef and searching, say
        try:
            errors = run_threads(worker, [(seed,) for seed in range(8)])
        finally:
            sys.setswitchinterval(interval)
    assert errors == []
    by_kind = Counter("search_many" if q == "search_many" else f"k={k}, filters={f}" for q, k, f in wrong)
    assert wrong == [], f"{len(wrong)} concurrent searches differ from single-threaded ones: {dict(by_kind)}"


@pytest.mark.parametrize("texts", [["Wings generate lift."], ["Wings generate lift.", "Heat shields and wings."]])
def test_tiny_indexes_give_matching_chunks_a_bm25_score(tmp_path, registry, registry_config, embedder, texts):
    src = tmp_path / "tiny.jsonl"
    src.write_text("".join(json.dumps({"doc_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    publish(src, registry, embedder)
    with open_retriever(registry_config, embedder, retrievers="bm25", reranker="none") as r:
        hits = r.search("lift", k=2)
    assert [h.doc_id for h in hits] == ["d0"]
    assert hits[0].bm25.score > 0 and hits[0].bm25.rank == 1


TITLED = [{"doc_id": "flutter", "text": "Flutter is a self-excited oscillation of a wing.",
           "metadata": {"title": "Wing flutter"}},
          {"doc_id": "plain", "text": "Heat shields protect capsules during reentry."}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chunk_table_keeps_each_chunks_context(tmp_path, registry, registry_config, embedder):
    src = _write_jsonl(tmp_path / "docs.jsonl", TITLED)
    publish(src, registry, embedder)
    _write_jsonl(src, TITLED + [{"doc_id": "new", "text": "Swept wings delay drag rise."}])
    second = publish(src, registry, embedder)  # incremental: the parent's rows are copied
    assert not second.full_build
    with open_retriever(registry_config, embedder) as r:
        v = r._current
        context = {v.columns["doc_id"][i]: v.columns["context"][i] for i in range(v.size)}
    assert context == {"flutter": "Wing flutter", "plain": "", "new": ""}


def test_versions_written_before_the_context_column_still_load(tmp_path, registry, registry_config, embedder):
    import pyarrow.parquet as pq

    from retrieval.artifacts import CHUNKS_FILE, MANIFEST, sha256_file

    from whole_copy import rewrite_as_whole_copy

    src = _write_jsonl(tmp_path / "docs.jsonl", TITLED)
    old = publish(src, registry, embedder).version
    rewrite_as_whole_copy(registry, registry_config.home / "artifacts", "docs", old, embedder.model_id)
    directory = registry_config.home / "artifacts" / "docs" / old
    # rewrite the version as the first manifest format wrote it: no context column
    chunks = pq.read_table(directory / CHUNKS_FILE)
    pq.write_table(chunks.drop_columns(["context"]), directory / CHUNKS_FILE)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["format"] = 1
    manifest["files"][CHUNKS_FILE] = {"sha256": sha256_file(directory / CHUNKS_FILE),
                                      "bytes": (directory / CHUNKS_FILE).stat().st_size}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    registry.mark_version_built(old, registry.get_version(old).artifact_uri, manifest)

    with open_retriever(registry_config, embedder) as r:
        hits = r.search("oscillation of a wing", k=2)
        assert r.version == old and hits[0].doc_id == "flutter"
        assert {r._current.columns["context"][i] for i in range(r._current.size)} == {None}  # read as no context
    # the next run does not extend a chunk table without contexts: it builds the version in full
    _write_jsonl(src, TITLED + [{"doc_id": "new", "text": "Swept wings delay drag rise."}])
    nxt = publish(src, registry, embedder)
    assert nxt.full_build
    rows = chunk_rows(registry, IndexConfig(), nxt.version)
    assert {r["doc_id"]: r["context"] for r in rows} == {"flutter": "Wing flutter", "plain": "", "new": ""}


BYPASS = ("# Engines\n\n## Turbofan bypass\n\n"
          + "\n\n".join(" ".join(f"Paragraph {p} sentence {s} describes fan pressure ratio and core flow." for s in range(9))
                        for p in range(4)) + "\n")


@pytest.mark.parametrize("chunk_context", ["headings", "section", "title"])
def test_heading_context_is_indexed_but_not_part_of_the_hit(tmp_path, registry, registry_config, embedder, chunk_context):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"doc_id": "engines.md", "text": BYPASS,
                                                  "metadata": {"title": "Propulsion notes"}}])
    publish(src, registry, embedder, chunk_context=chunk_context)
    with open_retriever(registry_config, embedder, retrievers="bm25", reranker="none") as r:
        hits = r.search("turbofan bypass", k=10)
        every = r.search("fan pressure ratio core flow", k=10)
    assert len(every) >= 2  # the section needs several chunks
    deep = [h for h in every if "bypass" not in h.text.lower()]
    assert deep, "a chunk of the section does not repeat its heading"
    for hit in every:  # hits carry the source's own text and offsets, never the context line
        assert BYPASS[hit.char_start:hit.char_end] == hit.text and not hit.text.startswith("Propulsion")
    found = {h.chunk_id for h in hits}
    if chunk_context != "title":  # BM25 reads the heading path in front of every chunk of the section
        assert {h.chunk_id for h in every} <= found
    else:  # only the chunk holding the heading line has its words
        assert found and not {h.chunk_id for h in deep} & found

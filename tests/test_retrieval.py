"""The retrieval library against real published versions: attribution, hybrid stages, filters, model
lock, following the alias, caches, tracing, and many threads through alias swaps."""

import json
import threading
import time
from datetime import datetime, timezone

import pytest

from pipeline.deterministic import DeterministicEmbedder
from conftest import write_tree
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
        assert r.search("heat shields", k=1) is cached  # result cache
        (corpus / "faq" / "heat.txt").write_text("Ablative heat shields char and erode during reentry.\n")
        second = publish(corpus, registry, embedder).version
        deadline = time.monotonic() + 10
        while r.version == first and time.monotonic() < deadline:  # NOTIFY, not the 30 s poll
            time.sleep(0.05)
        assert r.version == second
        fresh = r.search("heat shields", k=1)
        assert fresh is not cached and fresh[0].index_version == second and "Ablative" in fresh[0].text


def test_eight_threads_through_twenty_swaps(corpus, registry, registry_config, embedder):
    (corpus / "faq" / "wings.txt").write_text("Swept wings delay compressibility drag.\n")
    second = publish(corpus, registry, embedder).version
    first = [v["version"] for v in registry.list_versions("docs")][-1]
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
    assert stats["queries"] == 1 and 0.0 <= stats["mean_overlap_at_10"] <= 1.0 and stats["shadow_p50_ms"] > 0


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

    def knn_query(self, vectors, k):
        raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")


def test_search_many_searches_exactly_when_the_graph_returns_too_few(corpus, registry_config, embedder):
    queries = ["chunks are marked deleted", "rolled back instantly", "heat shields", "lift from pressure"]
    with open_retriever(registry_config, embedder, candidates=2, result_cache_size=0) as r:
        expected = [[(h.chunk_id, round(h.score, 5)) for h in r.search(q, k=2)] for q in queries]
        r._current.hnsw = _ShortGraph(r._current.hnsw)
        got = [[(h.chunk_id, round(h.score, 5)) for h in hits] for hits in r.search_many(queries, k=2)]
        single = [[(h.chunk_id, round(h.score, 5)) for h in r.search(q, k=2)] for q in queries]
    assert got == single  # the batch falls back query by query, as a single search does
    assert [g[0] for g in got] == [e[0] for e in expected]  # exact search finds what the graph found

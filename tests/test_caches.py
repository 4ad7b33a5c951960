"""The retriever's caches: the semantic cache's logic alone, then through real retrievers on real
versions (the deterministic embedder for the mechanics, the real model for a rephrased query)."""

import json

import numpy as np
import pytest

from conftest import run_threads, write_tree
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from retrieval import Retriever
from retrieval.caches import DEFAULT_SEMANTIC_COSINE, LRUCache, SemanticCache
from retrieval.config import RetrievalConfig


def _unit(rng, dim=16):
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_semantic_cache_returns_the_nearest_query_within_the_cosine():
    rng = np.random.default_rng(0)
    cache = SemanticCache(0.9, per_key=8)
    a, b = _unit(rng), _unit(rng)
    cache.put(("v1", "{}", 10), a, "query a", "hits of a")
    cache.put(("v1", "{}", 10), b, "query b", "hits of b")
    near_a = a + 0.1 * _unit(rng)  # cosine ~0.995 with a
    match = cache.get(("v1", "{}", 10), near_a * 3.0)  # the norm does not matter
    assert match is not None and match.value == "hits of a" and match.query == "query a"
    assert match.similarity == pytest.approx(float(a @ (near_a / np.linalg.norm(near_a))), abs=1e-5)
    assert cache.get(("v1", "{}", 10), _unit(rng)) is None  # a different query
    assert cache.get(("v1", "{}", 5), a) is None and cache.get(("v1", '{"doc_id_prefix": "x"}', 10), a) is None
    counters = cache.counters()
    assert (counters.hits, counters.misses, counters.entries) == (1, 3, 2)


def test_semantic_cache_is_bounded_and_drops_other_versions():
    rng = np.random.default_rng(1)
    cache = SemanticCache(0.99, per_key=4, keys=2)
    vectors = [_unit(rng) for _ in range(6)]
    for i, v in enumerate(vectors):
        cache.put(("v1", "{}", 10), v, f"q{i}", i)
    assert cache.get(("v1", "{}", 10), vectors[0]) is None  # the oldest were replaced
    assert cache.get(("v1", "{}", 10), vectors[5]).value == 5
    cache.put(("v2", "{}", 10), vectors[0], "q0", 0)
    cache.put(("v3", "{}", 10), vectors[1], "q1", 1)  # a third key: the least recently used goes
    assert cache.get(("v1", "{}", 10), vectors[5]) is None and cache.counters().entries == 2
    cache.retain_versions({"v3"})
    assert cache.get(("v2", "{}", 10), vectors[0]) is None and cache.get(("v3", "{}", 10), vectors[1]).value == 1


def test_caches_count_from_many_threads():
    rng = np.random.default_rng(2)
    cache, lru = SemanticCache(0.9, per_key=64), LRUCache(64)
    vectors = [_unit(rng) for _ in range(32)]

    def work(offset):
        for i in range(500):
            v = vectors[(i + offset) % 32]
            if cache.get(("v", "{}", 10), v) is None:
                cache.put(("v", "{}", 10), v, str(i), i)
            if lru.get(i % 40) is None:
                lru.put(i % 40, i)

    assert run_threads(work, [(n,) for n in range(6)]) == []
    counters = cache.counters()
    assert counters.hits + counters.misses == 3000 and counters.entries <= 64
    assert lru.counters().hits + lru.counters().misses == 3000



def test_settings_come_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_SIZE", "128")
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_COSINE", "0.9")
    monkeypatch.setenv("RAGPIPE_WARM_SECONDS", "")
    config = RetrievalConfig.from_env(semantic_cache_cosine=0.97)
    assert (config.semantic_cache_size, config.semantic_cache_cosine, config.warm_seconds) == (128, 0.97, 300.0)
    assert RetrievalConfig().semantic_cache_size == 0 and RetrievalConfig().semantic_cache_cosine == DEFAULT_SEMANTIC_COSINE
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_SIZE", "many")
    with pytest.raises(ValueError, match="RAGPIPE_SEMANTIC_CACHE_SIZE='many' is not a number"):
        RetrievalConfig.from_env()
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_SIZE", "0")
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_COSINE", "1.5")
    with pytest.raises(ValueError, match="semantic_cache_cosine must be within"):
        RetrievalConfig.from_env()


@pytest.fixture
def faq(tmp_path, registry, embedder):
    rows = [{"doc_id": f"{'en' if i % 2 else 'de'}/{i}", "text": text}
            for i, text in enumerate(["Wings generate lift from pressure differences over the surface.",
                                      "Heat shields protect capsules during reentry into the atmosphere.",
                                      "Boundary layers separate at high angles of attack and the wing stalls.",
                                      "Supersonic inlets slow the air with oblique shock waves.",
                                      "Flutter couples the bending and torsion of a wing panel."])]
    src = tmp_path / "faq.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    return src


@pytest.mark.db
def test_semantic_cache_through_the_retriever(faq, registry, registry_config, embedder):
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False, semantic_cache_size=32, semantic_cache_cosine=0.95) as r:
        first = r.search("how do heat shields protect capsules", k=3)
        assert first.cache is None and first.version == r.version
        again = r.search("how do heat shields protect capsules", k=3)
        assert again.cache == "exact" and again == first
        # the deterministic embedder hashes words, so a reordered query has the same vector
        reordered = r.search("capsules heat shields protect how do", k=3)
        assert reordered.cache == "semantic" and reordered.similarity > 0.99 and reordered == first
        assert reordered.cached_query == "how do heat shields protect capsules"
        assert r.search("supersonic inlets and shock waves", k=3).cache is None  # a different query
        assert r.search("capsules heat shields protect how do", k=2).cache is None  # k is part of the key
        assert r.search("capsules heat shields protect how do", k=3, filters={"doc_id_prefix": "en/"}).cache is None
        counters = r.cache_counters()
        assert counters["semantic"].hits == 1 and counters["semantic"].misses >= 3
        assert counters["result"].hits == 1
        stats = r.cache_stats()  # the form /metrics reads
        assert stats["semantic"] == (1, counters["semantic"].misses) and stats["result"][0] == 1
        # a new version: the semantic cache of the old one is dropped
        faq.write_text(faq.read_text() + json.dumps({"doc_id": "en/9", "text": "Capsules tumble."}) + "\n")
        second = run_index(str(faq), registry, embedder, IndexConfig(lock_timeout=5))
        assert r.refresh() and r.version == second.version
        after = r.search("capsules heat shields protect how do", k=3)
        assert after.cache is None and after.version == second.version


@pytest.mark.db
@pytest.mark.slow
def test_a_rephrased_query_hits_with_the_real_model(tmp_path, registry, registry_config):
    from pipeline.embedding import make_embedder

    from benchmarks.agent_trace import REPHRASE
    from retrieval.caches import DEFAULT_SEMANTIC_COSINE

    model = make_embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    write_tree(tmp_path / "src", {
        "lift.txt": "Wings generate lift from pressure differences over their surfaces.\n",
        "heat.txt": "Heat shields protect capsules from the heating of reentry.\n",
        "flutter.txt": "Flutter couples bending and torsion of wing panels at high speed.\n",
    })
    run_index(str(tmp_path / "src"), registry, model, IndexConfig(lock_timeout=5))
    query = "what problems of heat conduction in composite slabs have been solved so far ."
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False,
                        semantic_cache_size=32) as r:
        assert r.config.semantic_cache_cosine == DEFAULT_SEMANTIC_COSINE
        base = r.search(query, k=3)
        assert base.cache is None
        rephrased = r.search(REPHRASE["casing"](query), k=3)
        assert rephrased.cache == "semantic" and rephrased.similarity >= DEFAULT_SEMANTIC_COSINE
        assert [h.chunk_id for h in rephrased] == [h.chunk_id for h in base]
        other = r.search("how does flutter arise in wing panels", k=3)
        assert other.cache is None

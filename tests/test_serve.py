"""`ragpipe serve` over real published versions and a real uvicorn server: attributed hits from the
version named, limits answered 422 naming the field, authentication, feedback per version, a damaged
new version that leaves the old one served, shedding, deadlines, and alias swaps under load."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_threads
from serving import call, running
from test_corruption import flip_middle, publish, reports
from version_files import segment_dir

pytestmark = pytest.mark.db

service_app = pytest.importorskip("service.app", reason="needs ragpipe[serve]")
from retrieval import Retriever  # noqa: E402
from pipeline.config import IndexConfig  # noqa: E402
from retrieval.artifacts import MATRIX_FILE  # noqa: E402
from service.config import Limits, ServeConfig  # noqa: E402


@pytest.fixture
def versions(tmp_path, registry, embedder):
    """Two published versions of 40 one-chunk reports (the alias names the first): (a, b, source)."""
    src = reports(tmp_path / "src")
    a = publish(src, registry, embedder)
    b = publish(reports(src, revision=1), registry, embedder)
    registry.swap_alias("docs", a)
    return a, b, src


def app_for(registry_config, embedder, **settings):
    settings.setdefault("poll_interval", 0.2)
    return service_app.create_app(ServeConfig(registry=registry_config, **settings), encoder=embedder)


def search(base, query, **body):
    return call(base, "/v1/search", {"query": query, **body})


def test_hits_are_the_librarys_with_full_attribution_from_the_version_named(versions, registry_config, embedder):
    a, _, _ = versions
    queries = ["nozzle at Mach 0.4", "heat shield in tunnel 3", "vortex revision"]
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False) as library, running(app_for(registry_config, embedder)) as base:
        for q in queries:
            status, body, _ = search(base, q, k=4)
            assert status == 200, body
            assert body["index"] == "docs" and body["version"] == a and len(body["request_id"]) == 32
            expected = [h.to_dict() for h in library.search(q, k=4)]
            got = [{k: v for k, v in h.items() if k != "highlights"} for h in body["hits"]]
            assert got == json.loads(json.dumps(expected))  # every field of Hit.to_dict(), stage scores and ranks
            for hit in body["hits"]:
                for start, end in hit["highlights"]:  # the marked characters are words of the query
                    assert hit["text"][start:end].lower().rstrip("s") in q.lower()
        assert any(h["highlights"] for h in search(base, "nozzle", k=4)[1]["hits"])
        status, many, _ = call(base, "/v1/search_many", {"queries": queries, "k": 3, "filters": {"doc_id_prefix": "doc1"}})
        assert status == 200 and many["version"] == a and len(many["results"]) == 3
        for q, hits in zip(queries, many["results"]):
            assert [h["chunk_id"] for h in hits] == [h.chunk_id for h in library.search(q, 3, {"doc_id_prefix": "doc1"})]
            assert all(h["doc_id"].startswith("doc1") and h["index_version"] == a for h in hits)
        status, schema, _ = call(base, "/openapi.json")
        assert status == 200 and {"/v1/search", "/v1/search_many", "/v1/feedback", "/v1/indexes"} <= set(schema["paths"])
        assert "HitModel" in schema["components"]["schemas"]


def test_limits_and_bad_requests_are_answered_naming_the_field(versions, registry_config, embedder):
    limits = Limits(max_query_chars=50, max_k=20, max_batch=4, max_body_bytes=4096)
    with running(app_for(registry_config, embedder, limits=limits)) as base:
        def refused(path, body=None, raw=None):
            status, answer, _ = call(base, path, body, raw=raw)
            assert status == 422, (status, answer)
            return answer["detail"][0]

        assert refused("/v1/search", {"query": "x", "k": 21})["loc"] == ["body", "k"]
        too_long = refused("/v1/search", {"query": "y" * 51})
        assert too_long["loc"] == ["body", "query"] and "50" in too_long["msg"]
        assert refused("/v1/search_many", {"queries": ["a"] * 5})["loc"] == ["body", "queries"]
        assert refused("/v1/search_many", {"queries": ["a", "z" * 60]})["loc"] == ["body", "queries", "1"]
        assert "4096" in refused("/v1/search", {"query": "x", "filters": {"doc_id_prefix": "p" * 5000}})["msg"]
        assert refused("/v1/search", {"query": "x", "filters": {"colour": "red"}})["loc"] == ["body", "filters", "colour"]
        assert refused("/v1/search", {"query": "x", "top": 3})["loc"] == ["body", "top"]
        assert refused("/v1/search", raw=b'{"query": "x",')["type"] == "json_invalid"
        assert refused("/v1/search", {"query": "   "})["loc"] == ["body", "query"]
        assert refused("/v1/search", {"query": "x", "k": 0})["loc"] == ["body", "k"]
        status, answer, _ = search(base, "x", index="nope")
        assert status == 404 and "nope" in answer["detail"] and "docs" in answer["detail"]
        assert search(base, "nozzle", k=20)[0] == 200  # at the limits: answered


def test_bearer_tokens_guard_the_api_and_are_never_logged(versions, registry_config, embedder, tmp_path, monkeypatch,
                                                          caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RAGPIPE_SERVE_TOKENS", "alpha-token-1")
    tokens = tmp_path / "tokens"
    tokens.write_text("# one a line\nbeta-token-2\n")
    with running(app_for(registry_config, embedder, tokens_file=str(tokens))) as base:
        assert search(base, "nozzle")[0] == 401
        assert call(base, "/metrics")[0] == 401
        assert search(base, "nozzle", headers={"Authorization": "Bearer wrong"})[0] == 401
        for token in ("alpha-token-1", "beta-token-2"):
            assert call(base, "/v1/search", {"query": "nozzle"}, headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert call(base, "/healthz")[0] == 200 and call(base, "/readyz")[0] == 200
        status, _, headers = call(base, "/v1/search", {"query": "x"}, headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in {k.lower() for k in headers}  # CORS is off unless configured
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "alpha-token-1" not in logged and "beta-token-2" not in logged


def test_cors_answers_only_the_configured_origins(versions, registry_config, embedder):
    with running(app_for(registry_config, embedder, cors_origins=("https://app.example",))) as base:
        _, _, allowed = call(base, "/v1/search", {"query": "x"}, headers={"Origin": "https://app.example"})
        _, _, other = call(base, "/v1/search", {"query": "x"}, headers={"Origin": "https://evil.example"})
    assert allowed.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-origin" not in other


def test_feedback_is_recorded_with_the_version_that_served_and_reported_per_version(versions, registry,
                                                                                   registry_config, embedder, capsys):
    a, b, _ = versions
    with running(app_for(registry_config, embedder)) as base:
        first = search(base, "nozzle at Mach", k=3)[1]
        assert first["version"] == a
        scores = [(first["hits"][0]["chunk_id"], 1.0, "relevance", "user"),
                  (first["hits"][1]["chunk_id"], 0.0, "relevance", "user"),
                  (None, 0.5, "faithfulness", "judge")]
        for chunk_id, score, kind, source in scores:
            status, answer, _ = call(base, "/v1/feedback", {"request_id": first["request_id"], "chunk_id": chunk_id,
                                                           "score": score, "kind": kind, "source": source})
            assert status == 201 and answer["version"] == a, answer
        registry.swap_alias("docs", b)
        deadline = time.monotonic() + 20
        while search(base, "nozzle")[1]["version"] != b:
            assert time.monotonic() < deadline, "the service never followed the alias"
            time.sleep(0.05)
        second = search(base, "heat shield", k=2)[1]
        assert call(base, "/v1/feedback", {"request_id": second["request_id"], "score": -1, "kind": "thumbs",
                                           "source": "user"})[1]["version"] == b
        # what is refused: an unknown request, a chunk the response did not return, a bad kind or score
        status, answer, _ = call(base, "/v1/feedback", {"request_id": "0" * 32, "score": 1, "kind": "thumbs", "source": "user"})
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "request_id"]
        status, answer, _ = call(base, "/v1/feedback", {"request_id": second["request_id"], "chunk_id": "not-a-hit",
                                                        "score": 1, "kind": "relevance", "source": "user"})
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "chunk_id"] and "not-a-hit" in answer["detail"][0]["msg"]
        assert call(base, "/v1/feedback", {"request_id": second["request_id"], "score": 2, "kind": "thumbs",
                                           "source": "user"})[0] == 422
        assert call(base, "/v1/feedback", {"request_id": second["request_id"], "score": 1, "kind": "stars",
                                           "source": "user"})[0] == 422
        metrics = call(base, "/metrics")[1]
        assert 'ragpipe_serve_feedback_total{kind="relevance",source="user"} 2.0' in metrics
    from pipeline.cli import main

    assert main(["quality", "report", "--json", "--database-url", registry_config.database_url,
                 "--home", str(registry_config.home)]) == 0
    rows = {(r["version"], r["kind"], r["source"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[(a, "relevance", "user")]["count"] == 2 and rows[(a, "relevance", "user")]["mean"] == 0.5
    assert rows[(a, "faithfulness", "judge")]["count"] == 1 and rows[(b, "thumbs", "user")]["mean"] == -1.0
    assert set(rows) == {(a, "relevance", "user"), (a, "faithfulness", "judge"), (b, "thumbs", "user")}
    assert main(["quality", "report", "--index", "other", "--json", "--database-url", registry_config.database_url,
                 "--home", str(registry_config.home)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["versions", "list", "--json", "--database-url", registry_config.database_url,
                 "--home", str(registry_config.home)]) == 0
    listed = {v["version"]: v["feedback"] for v in json.loads(capsys.readouterr().out)}
    assert set(listed[a]) == {"relevance/user", "faithfulness/judge"}
    assert listed[a]["relevance/user"] == {"count": 2, "mean": 0.5} and listed[a]["faithfulness/judge"]["count"] == 1
    assert listed[b] == {"thumbs/user": {"count": 1, "mean": -1.0}}


def test_a_damaged_new_version_leaves_the_old_one_served_and_readyz_and_metrics_say_so(versions, registry,
                                                                                      registry_config, embedder):
    a, b, _ = versions
    flip_middle(segment_dir(registry, IndexConfig(), b, -1) / MATRIX_FILE)  # damaged before the alias serves it
    with running(app_for(registry_config, embedder)) as base:
        registry.swap_alias("docs", b)
        deadline = time.monotonic() + 20
        while not call(base, "/readyz")[1]["degraded"]:
            assert time.monotonic() < deadline, call(base, "/readyz")
            time.sleep(0.05)
        status, ready, _ = call(base, "/readyz")
        entry = ready["indexes"][0]
        assert status == 200 and entry["serving"] == a and entry["registry_names"] == b
        assert MATRIX_FILE in entry["refused"][b]
        status, body, _ = search(base, "nozzle at Mach", k=5)
        assert status == 200 and body["version"] == a and {h["index_version"] for h in body["hits"]} == {a}
        metrics = call(base, "/metrics")[1]
        assert f'ragpipe_serve_version_served{{index="docs",version="{a}"}} 1.0' in metrics
        assert f'ragpipe_serve_version_refused{{index="docs",version="{b}"}} 1.0' in metrics
        assert 'ragpipe_serve_degraded{index="docs"} 1.0' in metrics
        described = call(base, "/v1/indexes")[1]["indexes"][0]
        assert described["degraded"] and described["live_version"] == b and described["serving"] == a


def test_never_ready_while_the_alias_has_no_version(registry_config, embedder):
    app = app_for(registry_config, embedder, indexes=("docs",))
    with pytest.raises(AssertionError, match="never became ready"):  # nothing published: never ready
        with running(app, ready_timeout=1.5):
            pass


def test_a_full_queue_sheds_with_retry_after_and_a_deadline_answers_504(versions, registry_config, embedder):
    with running(app_for(registry_config, embedder, queue_size=2, search_threads=1, batch_window_ms=20,
                         max_batch_queries=1)) as base:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda i: search(base, f"nozzle {i}"), range(48)))
        statuses = [s for s, _, _ in answers]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
        shed = next(a for a in answers if a[0] == 429)
        assert int(shed[2]["retry-after"]) >= 1 and "queue_size 2" in shed[1]["detail"]
        assert 'ragpipe_serve_shed_total{index="docs"}' in call(base, "/metrics")[1]
    with running(app_for(registry_config, embedder, deadline_s=0.000001)) as base:
        status, body, _ = search(base, "nozzle")
        assert status == 504 and body["detail"]["deadline_s"] == 0.000001 and "deadline" in body["detail"]["message"]


def test_every_response_comes_from_one_version_through_alias_swaps(versions, registry, registry_config, embedder):
    a, b, _ = versions
    stop = threading.Event()
    seen: list[tuple[int | None, str | None, set[str]]] = []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 3:
                status, body, _ = search(base, f"report {i} nozzle shock {n}", k=5)
                versions_of_hits = {h["index_version"] for h in body["hits"]} if status == 200 else set()
            else:
                status, body, _ = call(base, "/v1/search_many", {"queries": [f"rotor {n}", f"flap {i}"], "k": 3})
                versions_of_hits = {h["index_version"] for hits in body["results"] for h in hits} if status == 200 else set()
            seen.append((status, body.get("version") if status == 200 else None, versions_of_hits))

    with running(app_for(registry_config, embedder)) as base:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            for i in range(10):
                registry.swap_alias("docs", b if i % 2 == 0 else a)
                time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert seen and all(status == 200 for status, _, _ in seen), {s for s, _, _ in seen}
    assert all(hits == {version} for _, version, hits in seen), "a response mixes versions"
    assert {version for _, version, _ in seen} == {a, b}


def test_batches_from_many_threads_equal_one_at_a_time(versions, registry_config, embedder):
    # the stemmer is per thread and the HNSW breadth is guarded (retrieval.vector.EfGate): batches run
    # concurrently in search threads must give what each query gives alone
    from retrieval.batch import Query
    from retrieval.bm25 import Analyzer
    from service.searching import run_batch

    analyzer = Analyzer()
    queries = [Query(f"{t} at Mach {i / 10:.1f} in tunnel {i % 7}", k=1 + i % 6) for i, t in
               enumerate(["wing", "nozzle", "shock", "boundary layer", "heat shield", "rotor", "flap", "vortex"] * 3)]
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False, result_cache_size=0, query_cache_size=0) as retriever:
        alone = [run_batch(retriever, analyzer, [q])[0].hits_json[0] for q in queries]
        results: dict[int, list[str]] = {}

        def worker(t: int) -> None:
            for _ in range(5):
                order = queries[t:] + queries[:t]
                got = run_batch(retriever, analyzer, order)[0].hits_json
                results.setdefault(t, []).extend(got[(i - t) % len(queries)] for i in range(len(queries)))

        assert run_threads(worker, [(t,) for t in range(8)]) == []
    for got in results.values():
        assert got == alone * 5


def test_a_canary_gets_its_share_of_sessions_and_each_session_keeps_its_version(versions, registry, registry_config,
                                                                                 embedder):
    a, b, _ = versions
    with running(app_for(registry_config, embedder)) as base:
        registry.start_canary("docs", b, 50.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body, _ = call(base, "/v1/indexes")
            if status == 200 and body["indexes"][0]["canary_version"] == b:
                break
            time.sleep(0.2)
        sessions = [f"client-{i}" for i in range(40)]
        while time.monotonic() < deadline:  # the retriever follows the canary within its poll interval
            if any(search(base, "nozzle", session=s)[1]["version"] == b for s in sessions):
                break
            time.sleep(0.2)
        served = {}
        for s in sessions:
            status, body, _ = search(base, "nozzle at Mach 0.4", k=3, session=s)
            assert status == 200, body
            assert {h["index_version"] for h in body["hits"]} == {body["version"]}
            served[s] = body["version"]
        assert set(served.values()) == {a, b}  # 50%: both versions among 40 sessions
        for s in sessions[:10]:  # the same key always gets the same version, from the header too
            status, body, _ = call(base, "/v1/search", {"query": "heat shield", "k": 2}, headers={"X-Session-Key": s})
            assert status == 200 and body["version"] == served[s], (s, body)
        registry.abort_canary("docs", reason="test")
        while time.monotonic() < deadline and any(search(base, "vortex", session=s)[1]["version"] != a
                                                  for s in sessions):
            time.sleep(0.2)
        assert all(search(base, "vortex revision", session=s)[1]["version"] == a for s in sessions)


def test_responses_say_how_they_were_served_exact_and_semantic_cache_hits_included(versions, registry_config,
                                                                                    embedder, monkeypatch):
    a, _, _ = versions
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_SIZE", "64")
    monkeypatch.setenv("RAGPIPE_SEMANTIC_CACHE_COSINE", "0.6")
    with running(app_for(registry_config, embedder)) as base:
        first = search(base, "heat shield nozzle in tunnel 3 at Mach 0.4", k=3)[1]
        assert first["served"] == {"route": "live", "cache": None, "similarity": None, "cached_query": None}
        again = search(base, "heat shield nozzle in tunnel 3 at Mach 0.4", k=3)[1]
        assert again["served"]["cache"] == "exact" and again["hits"] == first["hits"]
        near = search(base, "heat shield nozzle tunnel 3 Mach 0.4", k=3)[1]
        assert near["served"]["cache"] == "semantic", near["served"]
        assert near["served"]["cached_query"] == "heat shield nozzle in tunnel 3 at Mach 0.4"
        assert 0.6 <= near["served"]["similarity"] <= 1.0 + 1e-5 and near["hits"] == first["hits"]
        other = search(base, "vortex revision", k=3)[1]
        assert other["served"]["cache"] is None
        many = call(base, "/v1/search_many", {"queries": ["vortex revision", "shock wave"], "k": 3})[1]
        assert [s["cache"] for s in many["served"]] == ["exact", None] and many["version"] == a
        metrics = call(base, "/metrics")[1]
        assert 'cache="semantic"' in (metrics if isinstance(metrics, str) else metrics.decode())

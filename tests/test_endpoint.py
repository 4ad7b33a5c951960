"""The OpenAI-compatible embeddings backend against a real local HTTP server that speaks the API:
indexing through it, retries with backoff, the rate limit, the cache, retrieval, and the API key."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, write_tree
from embeddings_server import EmbeddingsServer, Failure
from pipeline.config import IndexConfig
from pipeline.embedding import make_embedder
from pipeline.runner import RunOptions, run_index
from retrieval.endpoint import EndpointConfig, EndpointEmbedder, estimate_tokens, public_url, retry_after_seconds
from retrieval.errors import EndpointUnavailable, ModelError

KEY = "sk-test-5ecret-d0-not-leak"
DOCS = {
    "wings.md": "# Wings\n\nFlow separation over an airfoil at a high angle of attack causes a wing to stall.\n",
    "bread.md": "# Bread\n\nKnead the dough, let it rise, then bake the loaf in a hot oven.\n",
    "heat.md": "# Heat\n\nConvective heat transfer to a flat plate in hypersonic flow heats the shield.\n",
    "tides.md": "# Tides\n\nThe moon's gravity raises ocean tides twice a day along the coast.\n",
}


@pytest.fixture
def server(monkeypatch):
    with EmbeddingsServer(dim=48, api_key=KEY) as srv:
        monkeypatch.setenv("RAGPIPE_EMBEDDINGS_URL", srv.url)
        monkeypatch.setenv("RAGPIPE_EMBEDDINGS_API_KEY", KEY)
        yield srv


def endpoint(server, batch_size=4, **kw):
    config = EndpointConfig(url=server.url, api_key=KEY, **{"backoff_base": 0.05, **kw})
    return EndpointEmbedder("openai:hash-48", config, batch_size=batch_size)


def test_embeddings_are_batched_ordered_normalized_and_their_dimension_learned(server):
    client = endpoint(server)
    texts = [f"text number {i} about wings" for i in range(10)]
    vectors = client.embed(texts)
    assert vectors.shape == (10, 48) and client.dim == 48  # learned from the first response
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # the server sends norm 3
    assert [len(r.inputs) for r in server.received] == [4, 4, 2] and {r.model for r in server.received} == {"hash-48"}
    np.testing.assert_allclose(vectors[7], client.embed([texts[7]])[0], atol=1e-6)  # order kept (server reverses)
    server.dims["hash-48"] = 40
    with pytest.raises(ModelError, match="returned 40 dimensions, earlier 48"):
        client.embed(["another model behind the same name"])


def test_retries_back_off_and_honour_retry_after(server, caplog):
    server.fail_next(Failure(429, {"Retry-After": "1"}), Failure(500), Failure(503))
    client = endpoint(server)
    started = time.monotonic()
    client.embed(["one text"])
    arrivals = [r.at for r in server.received]
    assert [r.status for r in server.received] == [429, 500, 503, 200] and client.requests == 4
    assert arrivals[1] - arrivals[0] >= 1.0  # Retry-After: 1 waited out
    assert 0.025 <= arrivals[2] - arrivals[1] < 0.9 and 0.05 <= arrivals[3] - arrivals[2] < 0.9  # 0.05 s doubling, jittered
    assert time.monotonic() - started < 5
    assert "HTTP 429; retry 1 of 6 in 1.00 s" in caplog.text and KEY not in caplog.text

    server.reset()
    server.fail_next(*[Failure(502)] * 3)
    with pytest.raises(EndpointUnavailable, match="failed 3 times \\(last: HTTP 502\\); run again later") as info:
        endpoint(server, max_retries=2).embed(["x"])
    assert info.value.transient and len(server.received) == 3

    server.reset()
    server.fail_next(Failure(400, body='{"error": {"message": "input too long"}}'))
    with pytest.raises(ModelError, match="HTTP 400 .*input too long") as info:
        endpoint(server).embed(["x"])
    assert not info.value.transient and len(server.received) == 1  # a 4xx other than 429 is not retried


def test_retry_after_parsing_and_public_urls():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2026 07:28:05 GMT", now=1792567680.0) == pytest.approx(5.0)
    assert public_url("https://user:pw@example.com:8443/v1?api-key=k#x") == "https://example.com:8443/v1"
    assert estimate_tokens(["abcd", "abcde", ""]) == 1 + 2 + 1


def test_the_rate_limit_holds_over_every_interval(server):
    rps, tpm = 20.0, 6000.0  # 0.05 s per request, 100 tokens per second
    client = endpoint(server, requests_per_second=rps, tokens_per_minute=tpm, batch_size=2)
    texts = ["a short one", "x" * 40, "tiny", "y" * 12, "z", "w" * 30, "the last text of the lot", "q" * 20] * 2
    client.embed(texts)
    arrivals = [r.at for r in server.received]
    tokens = [estimate_tokens(r.inputs) for r in server.received]
    assert len(arrivals) == 8
    slack = 0.02  # arrival times measured by the server, not the client's send times
    for i in range(len(arrivals)):
        for j in range(i + 1, len(arrivals)):
            span = arrivals[j] - arrivals[i]
            assert span >= (j - i) / rps - slack, (i, j, span)
            assert sum(tokens[i:j]) <= (span + slack) * tpm / 60, (i, j, span, tokens[i:j])


def test_a_wrong_key_fails_at_once_and_the_key_never_shows(server):
    config = EndpointConfig(url=server.url, api_key="sk-wrong-key-0123456789")
    with pytest.raises(ModelError) as info:
        EndpointEmbedder("openai:hash-48", config).embed(["x"])
    message = str(info.value)
    assert "HTTP 401" in message and "Incorrect API key provided: ***" in message  # the server echoed it: masked
    assert "sk-wrong-key-0123456789" not in message and len(server.received) == 1
    assert "sk-wrong" not in repr(config)
    with pytest.raises(ModelError, match="set RAGPIPE_EMBEDDINGS_URL"):
        EndpointEmbedder("openai:x", EndpointConfig())


@pytest.mark.db
def test_the_pipeline_indexes_through_the_endpoint_and_the_cache_spares_a_second_run(
        tmp_path, server, registry, registry_config, caplog):
    from retrieval import Retriever

    root = write_tree(tmp_path / "src", DOCS)
    server.fail_next(Failure(429, {"Retry-After": "1"}), Failure(503))
    embedder = make_embedder("openai:hash-48", batch_size=2, query_prefix="search_query: ",
                             passage_prefix="search_document: ")
    config = IndexConfig(index="docs", artifacts=str(tmp_path / "artifacts"), min_recall=0.0, batch_size=2)
    summary = run_index(str(root), registry, embedder, config)
    assert summary.status == "succeeded" and summary.model_id == "openai:hash-48"
    assert summary.embedding["chunks_embedded"] == 4
    assert [r.status for r in server.received] == [429, 503, 200, 200]  # two retries, then two batches of 2
    assert all(t.startswith("search_document: ") for r in server.served() for t in r.inputs)
    manifest = json.loads((tmp_path / "artifacts" / "docs" / summary.version / "manifest.json").read_text())
    assert manifest["model"]["dim"] == 48 and "encoder" not in manifest["model"]  # queries go over HTTP
    assert manifest["model"]["endpoint"] == {"api": "openai-embeddings", "model": "hash-48", "url": server.url}
    assert manifest["model"]["query_prefix"] == "search_query: "

    server.reset()
    again = run_index(str(root), registry, make_embedder("openai:hash-48", query_prefix="search_query: ",
                                                         passage_prefix="search_document: "),
                      config, options=RunOptions(full=True))
    other = run_index(str(root), registry, make_embedder("openai:hash-48", query_prefix="search_query: ",
                                                         passage_prefix="search_document: "),
                      IndexConfig(index="copy", artifacts=str(tmp_path / "artifacts"), min_recall=0.0))
    assert again.version and other.version and server.received == []  # every text came from the cache
    assert other.embedding == {"chunks_embedded": 0, "chunks_cached": 4, "chars_embedded": 0}

    os.environ.pop("RAGPIPE_EMBEDDINGS_URL")  # a retriever elsewhere: the manifest's URL, the key from its env
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False) as retriever:
        hits = retriever.search("why does a wing stall at a high angle of attack?", k=2)
        assert hits[0].doc_id == "wings.md" and hits[0].model_id == "openai:hash-48"
        assert type(retriever._encoder(retriever._current)).__name__ == "EndpointEmbedder"
    assert [r.inputs for r in server.received] == [["search_query: why does a wing stall at a high angle of attack?"]]

    # the key is in no log line, manifest, artifact or registry row
    assert KEY not in caplog.text
    for path in (tmp_path / "artifacts").rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    dump = subprocess.run(["pg_dump", "--data-only", registry_config.database_url], capture_output=True, text=True,
                          check=True).stdout
    assert "openai:hash-48" in dump and KEY not in dump


@pytest.mark.db
@pytest.mark.slow
def test_ragpipe_index_through_a_failing_endpoint_exits_75_without_the_key(tmp_path, server, database_url):
    root = write_tree(tmp_path / "src", DOCS)
    server.fail_next(*[Failure(500, body=json.dumps({"error": {"message": f"upstream broke for {KEY}"}}))] * 3)
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, RAGPIPE_HOME=str(tmp_path / "home"),
               RAGPIPE_MODEL="openai:hash-48", RAGPIPE_EMBEDDINGS_MAX_RETRIES="2", RAGPIPE_MIN_RECALL="0")
    failed = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(root)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 75, failed.stderr
    assert "failed 3 times (last: HTTP 500); run again later" in failed.stderr and KEY not in failed.stderr + failed.stdout
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(root), "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedding"]["chunks_embedded"] == 4 and KEY not in done.stdout + done.stderr

"""The service's pure parts: micro-batching (sizes, windows, one request never split, shedding,
deadlines), the request memory, bearer tokens, limits, highlights and configuration."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs ragpipe[serve]")
from retrieval.batch import Query  # noqa: E402
from retrieval.bm25 import Analyzer  # noqa: E402
from service.batching import BatchStats, DeadlinePassed, MicroBatcher, Overloaded  # noqa: E402
from service.config import Limits, ServeConfig  # noqa: E402
from service.memory import Answer, RequestMemory  # noqa: E402
from service.schemas import FieldError, check_limits  # noqa: E402
from service.searching import highlight_spans  # noqa: E402
from service.security import token_accepted  # noqa: E402
from service.server import config_environment  # noqa: E402


class Echo:
    """A search over nothing: each query's text back, the batches it was given recorded (pure logic)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, queries: list[Query]):  # type: ignore[no-untyped-def]
        with self.lock:
            self.batches.append([q.text for q in queries])
        time.sleep(self.seconds)
        return _Texts([q.text for q in queries]), {"embed": self.seconds}


class _Texts(list):  # type: ignore[type-arg]
    def slice(self, start: int, count: int) -> list[str]:
        return self[start:start + count]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def batcher_with(search, **kw):  # type: ignore[no-untyped-def]
    kw = {"window_s": 0.01, "max_queries": 64, "queue_size": 1000, "threads": 1, **kw}
    pool = ThreadPoolExecutor(2)
    stats: list[BatchStats] = []
    batcher = MicroBatcher(search, pool, on_batch=stats.append, **kw)
    batcher.start()
    return batcher, stats


def test_requests_that_arrive_together_share_one_batch_and_keep_their_order():
    echo = Echo()

    async def main():  # type: ignore[no-untyped-def]
        batcher, stats = await batcher_with(echo)
        deadline = asyncio.get_running_loop().time() + 5
        answers = await asyncio.gather(*(batcher.submit([Query(f"q{i}")], deadline) for i in range(20)))
        await batcher.stop()
        return answers, stats

    answers, stats = run(main())
    assert [a[0] for a in answers] == [[f"q{i}"] for i in range(20)]
    assert echo.batches == [[f"q{i}" for i in range(20)]]
    assert stats[0].queries == 20 and len(stats[0].waits) == 20


def test_batches_are_bounded_and_never_split_a_request():
    echo = Echo()

    async def main():  # type: ignore[no-untyped-def]
        batcher, _ = await batcher_with(echo, max_queries=5)
        deadline = asyncio.get_running_loop().time() + 5
        requests = [[Query(f"r{r}.{i}") for i in range(3)] for r in range(6)]
        answers = await asyncio.gather(*(batcher.submit(qs, deadline) for qs in requests))
        await batcher.stop()
        return answers

    answers = run(main())
    assert [len(a[0]) for a in answers] == [3] * 6
    assert all(len(batch) <= 5 for batch in echo.batches)
    assert len(echo.batches) >= 6 // (5 // 3)
    for batch in echo.batches:  # whole requests only
        assert sorted(Counter(q.split(".")[0] for q in batch).values()) == [3] * (len(batch) // 3), batch


def test_while_the_threads_are_busy_the_queue_fills_and_the_next_batch_takes_it_all():
    echo = Echo(seconds=0.2)

    async def main():  # type: ignore[no-untyped-def]
        batcher, _ = await batcher_with(echo, window_s=0.001)
        deadline = asyncio.get_running_loop().time() + 5
        first = asyncio.ensure_future(batcher.submit([Query("first")], deadline))
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [asyncio.ensure_future(batcher.submit([Query(f"q{i}")], deadline)) for i in range(10)]
        await asyncio.sleep(0.01)
        depth = batcher.depth
        await asyncio.gather(first, *rest)
        await batcher.stop()
        return depth

    assert run(main()) == 10
    assert echo.batches == [["first"], [f"q{i}" for i in range(10)]]


def test_a_full_queue_sheds_and_a_passed_deadline_fails_the_request():
    echo = Echo(seconds=0.2)

    async def main():  # type: ignore[no-untyped-def]
        batcher, _ = await batcher_with(echo, queue_size=3, window_s=0.001)
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(batcher.submit([Query("busy")], loop.time() + 5))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit([Query(f"q{i}")], loop.time() + 0.05)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as shed:
            await batcher.submit([Query("one too many")], loop.time() + 5)
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        await running
        await batcher.stop()
        return shed.value, outcomes

    shed, outcomes = run(main())
    assert shed.retry_after >= 1 and "queue_size 3" in str(shed)
    assert all(isinstance(o, (TimeoutError, DeadlinePassed)) for o in outcomes), outcomes
    assert ["q0"] not in echo.batches  # expired before a batch took them: never searched


def test_a_request_that_would_wait_beyond_the_budget_is_shed():
    echo = Echo(seconds=0.1)  # 10 queries per second, one at a time

    async def main():  # type: ignore[no-untyped-def]
        batcher, _ = await batcher_with(echo, max_queries=1, window_s=0.0, max_wait_s=0.25)
        loop = asyncio.get_running_loop()
        await batcher.submit([Query("learn the rate")], loop.time() + 5)
        admitted = [asyncio.ensure_future(batcher.submit([Query(f"q{i}")], loop.time() + 5)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="max_queue_wait_ms 250"):
            for i in range(5):
                await batcher.submit([Query(f"late {i}")], loop.time() + 5)
        await asyncio.gather(*admitted)
        await batcher.stop()

    run(main())


def test_request_memory_forgets_after_its_ttl_and_beyond_its_size():
    now = [0.0]
    memory = RequestMemory(size=2, ttl_s=10, clock=lambda: now[0])
    answer = lambda i: Answer(f"r{i}", "docs", "v1", frozenset({"c"}), "q")  # noqa: E731
    memory.remember(answer(1))
    now[0] = 5
    memory.remember(answer(2))
    assert memory.recall("r1") == answer(1)
    now[0] = 11
    assert memory.recall("r1") is None and memory.recall("r2") == answer(2)
    memory.remember(answer(3))
    memory.remember(answer(4))
    assert memory.recall("r2") is None and memory.recall("r4") == answer(4)


def test_bearer_tokens():
    tokens = frozenset({"s3cret", "other"})
    assert token_accepted("Bearer s3cret", tokens) and token_accepted("Bearer other", tokens)
    assert not token_accepted("Bearer s3cre", tokens) and not token_accepted("s3cret", tokens)
    assert not token_accepted(None, tokens) and not token_accepted("Basic s3cret", tokens)
    assert token_accepted(None, frozenset())  # no tokens configured: no authentication


def test_limits_name_the_field():
    limits = Limits(max_query_chars=5, max_k=3, max_batch=2)
    check_limits(limits, ["abcde"], 3, single=True)
    for queries, k, single, field in [(["abcdef"], 1, True, "query"), (["a"], 4, True, "k"),
                                      (["a", "b", "c"], 1, False, "queries"), (["a", "abcdef"], 1, False, "queries[1]"),
                                      ([" "], 1, True, "query")]:
        with pytest.raises(FieldError) as refused:
            check_limits(limits, queries, k, single=single)
        assert refused.value.field == field


def test_highlights_mark_the_words_whose_terms_match():
    text = "Deleted documents leave the index; the SOURCE is scanned."
    spans = highlight_spans(Analyzer(), "document deletes from sources", text)
    assert [text[s:e] for s, e in spans] == ["Deleted", "documents", "SOURCE"]
    assert highlight_spans(Analyzer(), "the of", text) == []  # stop words alone match nothing


def test_configuration_from_the_environment_and_back():
    env = {"RAGPIPE_SERVE_INDEXES": "docs, kb", "RAGPIPE_SERVE_PORT": "9000", "RAGPIPE_SERVE_MAX_K": "7",
           "RAGPIPE_SERVE_BATCH_WINDOW_MS": "3.5", "RAGPIPE_SERVE_CORS_ORIGINS": "https://a.example",
           "RAGPIPE_SERVE_MAX_QUEUE_WAIT_MS": "80"}
    config = ServeConfig.from_env(env, port=9001)
    assert config.indexes == ("docs", "kb") and config.port == 9001 and config.limits.max_k == 7
    assert config.batch_window_ms == 3.5 and config.cors_origins == ("https://a.example",)
    assert config.max_queue_wait_ms == 80.0 and config.default_index is None
    assert ServeConfig.from_env(config_environment(config)) == config  # what a worker process rebuilds
    assert ServeConfig.from_env({"RAGPIPE_DATABASE_URL": "postgresql://db/x"}).registry.database_url == "postgresql://db/x"
    with pytest.raises(ValueError, match="RAGPIPE_SERVE_PORT"):
        ServeConfig.from_env({"RAGPIPE_SERVE_PORT": "eighty"})
    with pytest.raises(ValueError, match="queue_size"):
        ServeConfig(queue_size=0)

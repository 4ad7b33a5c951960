"""Micro-batching: queries that arrive together share one encoder call and one HNSW call.

request ─► bounded queue (full: shed, 429) ─► batch (a few ms window, bounded size) ─► thread ─► futures

One :class:`MicroBatcher` per served alias. A batch is assembled only when a search thread is free,
so while every thread is busy the queue fills and the next batch takes what accumulated (Text
Embeddings Inference's queue does the same). The queries of one request always go into the same
batch, so one request's hits come from one version. The event loop only moves requests; encoding,
searching and serializing run in the search threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from retrieval.batch import Query

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: the request is shed. ``retry_after`` is seconds, a guess from recent throughput."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlinePassed(Exception):
    """The request's deadline passed while it waited in the queue."""


@dataclass
class _Pending:
    queries: list[Query]
    future: asyncio.Future[Any]
    deadline: float  # loop time
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for the metrics: its size, each request's wait, each stage's seconds."""

    queries: int
    waits: list[float]
    stage_seconds: dict[str, float]


class MicroBatcher:
    """Collects queries for up to ``window_s`` (or ``max_queries``) and runs ``search`` on them in ``executor``.

    A request is shed (:class:`Overloaded`) when ``queue_size`` queries wait already, or when the
    queries ahead of it (waiting or running) would take longer than ``max_wait_s`` at the throughput of
    recent batches.

    Args:
        search: runs one batch of queries in a search thread; returns one result per query and a
            dict of stage seconds, as ``(results, stage_seconds)``, all results from one version.
        executor: the search threads (shared by the batchers of every alias).
        threads: how many batches of this batcher may run at once.
        max_wait_s: the longest a request should wait for its batch (None: as long as ``queue_size`` allows).
        on_batch: called on the event loop after each batch (metrics).
        on_depth: called with the queue depth (queries) whenever it changes.
    """

    def __init__(self, search: Callable[[list[Query]], tuple[Any, dict[str, float]]], executor: Executor, *,
                 window_s: float, max_queries: int, queue_size: int, threads: int, max_wait_s: float | None = None,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None,
                 on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self._search = search
        self._executor = executor
        self.window_s = window_s
        self.max_queries = max_queries
        self.queue_size = queue_size
        self.max_wait_s = max_wait_s
        self._pending: deque[_Pending] = deque()
        self._depth = 0
        self._running = 0  # queries in batches that run now
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(threads)
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._rate = 0.0  # queries per second, smoothed over recent batches
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Queries waiting for a batch."""
        return self._depth

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ragpipe-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded("the service is shutting down", retry_after=1))

    async def submit(self, queries: Sequence[Query], deadline: float) -> tuple[Any, float]:
        """Queue ``queries`` (one request's) and wait for their batch.

        Args:
            deadline: loop time by which the request must be answered.

        Returns:
            The results of these queries from ``search`` and the seconds they waited in the queue.

        Raises:
            Overloaded: the queue holds ``queue_size`` queries already.
            DeadlinePassed: the deadline passed before a batch took the request.
            TimeoutError: the deadline passed while its batch ran.
        """
        queries = list(queries)
        if self._depth + len(queries) > self.queue_size:
            raise Overloaded(f"{self._depth} queries are waiting (queue_size {self.queue_size})",
                             retry_after=max(1, round(self._depth / self._rate)) if self._rate else 1)
        ahead = self._depth + self._running
        if self.max_wait_s is not None and self._rate and ahead / self._rate > self.max_wait_s:
            wait = ahead / self._rate  # the queries ahead of this request, at the recent throughput
            raise Overloaded(f"{self._depth} queries are waiting and {self._running} running, about "
                             f"{wait * 1000:.0f} ms of work (max_queue_wait_ms {self.max_wait_s * 1000:.0f})",
                             retry_after=max(1, round(wait)))
        loop = asyncio.get_running_loop()
        item = _Pending(queries, loop.create_future(), deadline)
        self._pending.append(item)
        self._set_depth(self._depth + len(queries))
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), max(0.0, deadline - loop.time()))
        except (TimeoutError, asyncio.CancelledError):
            item.future.cancel()  # still queued: no batch takes it (running: its result is dropped)
            raise

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._on_depth(depth)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # assemble only when a thread can take the batch
            try:
                batch = await self._assemble(loop)
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            started = time.perf_counter()
            flat = [q for item in batch for q in item.queries]
            self._running += len(flat)
            waits = [started - item.enqueued for item in batch]
            future = loop.run_in_executor(self._executor, self._search, flat)
            future.add_done_callback(lambda f, batch=batch, waits=waits, started=started:
                                     self._finish(f, batch, waits, started))

    async def _assemble(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        # idle: nothing would arrive sooner than a batch of one returns, so a lone query does not wait;
        # while a batch runs, the window lets the queries arriving together join one batch
        window_ends = loop.time() + (self.window_s if self._running else 0.0)
        while sum(len(item.queries) for item in self._pending) < self.max_queries:
            remaining = window_ends - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Pending] = []
        count = 0
        now = loop.time()
        while self._pending and (not batch or count + len(self._pending[0].queries) <= self.max_queries):
            item = self._pending.popleft()
            self._set_depth(self._depth - len(item.queries))
            if item.future.done():  # its client went away
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlinePassed("the deadline passed while the request was queued"))
                continue
            batch.append(item)
            count += len(item.queries)
        return batch

    def _finish(self, done: asyncio.Future[Any], batch: list[_Pending], waits: list[float], started: float) -> None:
        self._slots.release()
        queries = sum(len(item.queries) for item in batch)
        self._running -= queries
        elapsed = time.perf_counter() - started
        exc = done.exception()
        if exc is not None:
            logger.error("a batch of %d requests failed: %s", len(batch), exc, exc_info=exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        results, stages = done.result()
        if elapsed > 0:
            self._rate = 0.8 * self._rate + 0.2 * (queries / elapsed) if self._rate else queries / elapsed
        offset = 0
        for item, wait in zip(batch, waits):
            n = len(item.queries)
            if not item.future.done():
                item.future.set_result((results.slice(offset, n), wait))
            offset += n
        self._on_batch(BatchStats(queries, waits, stages))

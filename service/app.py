"""The HTTP app: an app factory over a :class:`ServeConfig`, a lifespan that opens and closes the served
aliases, and handlers of a few lines over the retrieval library.

request ─► body limit ─► auth ─► validate ─► micro-batcher (per alias) ─► search thread ─► JSON
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.extras import require

require("fastapi", "serve", "ragpipe serve")
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402

from registry.errors import RegistryError  # noqa: E402
from retrieval.batch import Query  # noqa: E402
from retrieval.bm25 import Analyzer  # noqa: E402
from service.batching import DeadlinePassed, MicroBatcher, Overloaded  # noqa: E402
from service.config import ServeConfig  # noqa: E402
from service.feedback import record  # noqa: E402
from service.indexes import NotReady, ServedIndexes, UnknownIndex  # noqa: E402
from service.memory import Answer, RequestMemory  # noqa: E402
from service.metrics import CountResponses, ServiceMetrics  # noqa: E402
from service.schemas import (  # noqa: E402
    FeedbackRequest,
    FeedbackResponse,
    FieldError,
    SearchManyRequest,
    SearchManyResponse,
    SearchRequest,
    SearchResponse,
    check_limits,
)
from service.security import BodyLimit, token_accepted  # noqa: E402

logger = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


@dataclass
class ServiceState:
    """What the handlers share: the served aliases, their batchers, the search threads, the metrics."""

    config: ServeConfig
    served: ServedIndexes
    metrics: ServiceMetrics
    executor: ThreadPoolExecutor
    memory: RequestMemory
    tokens: frozenset[str]
    analyzer: Analyzer = field(default_factory=Analyzer)
    batchers: dict[tuple[str, str], MicroBatcher] = field(default_factory=dict)

    def batcher(self, alias: str, route: str = "live") -> MicroBatcher:
        """The batcher of the alias's ``live`` or ``canary`` version, started on first use (on the event loop)."""
        found = self.batchers.get((alias, route))
        if found is None:
            from service.searching import run_batch

            retriever = self.served.retriever(alias)
            found = MicroBatcher(lambda queries: run_batch(retriever, self.analyzer, queries, route), self.executor,
                                 window_s=self.config.batch_window_ms / 1000, max_queries=self.config.max_batch_queries,
                                 queue_size=self.config.queue_size, threads=self.config.search_threads,
                                 max_wait_s=(self.config.max_queue_wait_ms / 1000 if self.config.max_queue_wait_ms
                                             is not None else self.config.deadline_s),
                                 on_batch=self.metrics.observe_batch,
                                 on_depth=self.metrics.queue_depth.labels(alias).set)
            found.start()
            self.batchers[(alias, route)] = found
        return found


class ApiError(Exception):
    """An error answered with ``status`` and a JSON body naming what went wrong."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def create_app(config: ServeConfig | None = None, *, encoder: Any = None) -> FastAPI:
    """The service's ASGI app.

    Args:
        config: what to serve and how; None reads the environment (:meth:`ServeConfig.from_env`).
        encoder: the query encoder every served alias uses (``Retriever.open(encoder=...)``); None: each
            version's own.
    """
    config = config or ServeConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = ServedIndexes(config, encoder)
        state = ServiceState(config, served, ServiceMetrics(served), ThreadPoolExecutor(
            config.search_threads, thread_name_prefix="ragpipe-search"),
            RequestMemory(config.remember_requests, config.remember_s), config.load_tokens())
        app.state.service = state
        served.start()
        try:
            yield
        finally:
            for batcher in state.batchers.values():
                await batcher.stop()
            state.executor.shutdown(wait=True, cancel_futures=True)
            await asyncio.to_thread(served.close)

    app = FastAPI(title="ragpipe", version=_version(), lifespan=lifespan,
                  description="Hybrid search over ragpipe's published index versions, with attribution.")
    _routes(app)
    _errors(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(CountResponses)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragpipe")
    except PackageNotFoundError:  # a checkout that is not installed
        return "0+unknown"


def _state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


def _authorized(request: Request) -> ServiceState:
    state = _state(request)
    if not token_accepted(request.headers.get("authorization"), state.tokens):
        raise ApiError(401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                       {"WWW-Authenticate": "Bearer"})
    return state


async def _answer(state: ServiceState, index: str | None, queries: list[Query], endpoint: str,
                  session: str | None = None) -> tuple[Any, str]:
    """Run one request's queries through the batcher of the version the request routes to; map
    queueing failures to HTTP answers.

    While the alias has a canary, ``session`` (a client or session key: the same key always gets the
    same version) routes the request, else its request id does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.deadline_s
    try:
        alias = index or state.served.default_alias()
    except UnknownIndex as exc:
        raise FieldError("index", str(exc)) from exc
    request_id = uuid.uuid4().hex
    try:
        _version, route = state.served.retriever(alias).route(session or request_id)
        batcher = state.batcher(alias, route)
        answered, _wait = await batcher.submit(queries, deadline)
    except Overloaded as exc:
        state.metrics.shed.labels(alias).inc()
        raise ApiError(429, f"index {alias!r} is overloaded: {exc}; retry after {exc.retry_after} s",
                       {"Retry-After": str(exc.retry_after)}) from exc
    except (DeadlinePassed, TimeoutError) as exc:
        state.metrics.deadline.labels(alias).inc()
        raise ApiError(504, {"request_id": request_id, "deadline_s": state.config.deadline_s,
                             "message": f"request {request_id} on index {alias!r} was not answered within its "
                                        f"deadline of {state.config.deadline_s} s (RAGPIPE_SERVE_DEADLINE_S)"}) from exc
    texts = [q.text for q in queries]
    state.memory.remember(Answer(request_id, answered.alias, answered.version,
                                 frozenset(c for ids in answered.chunk_ids for c in ids),
                                 texts[0] if len(texts) == 1 else json.dumps(texts)))
    return answered, request_id


# the header that routes a request while its alias has a canary (or the body's ``session``)
SESSION_HEADER = "X-Session-Key"


def _routes(app: FastAPI) -> None:
    @app.post("/v1/search", response_model=SearchResponse, tags=["search"])
    async def search(body: SearchRequest, request: Request, state: ServiceState = Depends(_authorized)) -> Response:
        """The ``k`` best chunks for ``query`` from one version, with every stage's score and rank."""
        started = time.perf_counter()
        check_limits(state.config.limits, [body.query], body.k, single=True)
        filters = body.filters.to_retrieval() if body.filters else None
        answered, request_id = await _answer(state, body.index, [Query(body.query, body.k, filters)], "search",
                                             body.session or request.headers.get(SESSION_HEADER))
        payload = (f'{{"request_id":"{request_id}","index":{json.dumps(answered.alias)},'
                   f'"version":{json.dumps(answered.version)},"served":{answered.served(0)},'
                   f'"hits":{answered.hits_json[0]}}}')
        state.metrics.stage_seconds.labels("request").observe(time.perf_counter() - started)
        return Response(payload, media_type="application/json")

    @app.post("/v1/search_many", response_model=SearchManyResponse, tags=["search"])
    async def search_many(body: SearchManyRequest, request: Request,
                          state: ServiceState = Depends(_authorized)) -> Response:
        """Several queries answered from one version; ``results[i]`` holds the hits of ``queries[i]``."""
        check_limits(state.config.limits, body.queries, body.k, single=False)
        filters = body.filters.to_retrieval() if body.filters else None
        answered, request_id = await _answer(state, body.index, [Query(q, body.k, filters) for q in body.queries],
                                             "search_many", body.session or request.headers.get(SESSION_HEADER))
        payload = (f'{{"request_id":"{request_id}","index":{json.dumps(answered.alias)},'
                   f'"version":{json.dumps(answered.version)},'
                   f'"served":[{",".join(answered.served(i) for i in range(len(answered.hits_json)))}],'
                   f'"results":[{",".join(answered.hits_json)}]}}')
        return Response(payload, media_type="application/json")

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, tags=["quality"])
    async def feedback(body: FeedbackRequest, state: ServiceState = Depends(_authorized)) -> JSONResponse:
        """Record a score for a response (or one of its hits) with the version that served it."""
        answer = state.memory.recall(body.request_id)
        if answer is None:
            raise FieldError("request_id", f"request_id {body.request_id!r} is unknown or older than "
                                           f"{state.config.remember_s:.0f} s (RAGPIPE_SERVE_REMEMBER_S)")
        if body.chunk_id is not None and body.chunk_id not in answer.chunk_ids:
            raise FieldError("chunk_id", f"chunk_id {body.chunk_id!r} is not a hit of request {body.request_id}")
        feedback_id = await asyncio.to_thread(record, state.served, answer, body)
        state.metrics.feedback.labels(body.kind, body.source).inc()
        return JSONResponse({"feedback_id": feedback_id, "request_id": answer.request_id, "index": answer.alias,
                             "version": answer.version}, status_code=201)

    @app.get("/v1/indexes", tags=["indexes"])
    async def indexes(state: ServiceState = Depends(_authorized)) -> JSONResponse:
        """Served aliases: live and shadow versions, versions with status and validation metrics, latest runs."""
        return JSONResponse(await asyncio.to_thread(state.served.describe))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """200 once every served alias has a loaded, checksum-verified version; says which versions were refused."""
        state = _state(request)
        statuses = await asyncio.to_thread(state.served.status, True)
        ready = bool(statuses) and all(s.loaded for s in statuses)
        body = {"ready": ready, "degraded": any(s.degraded for s in statuses),
                "indexes": [{"index": s.alias, "loaded": s.loaded, "serving": s.serving, "registry_names": s.named,
                             "degraded": s.degraded, "refused": s.refused, "error": s.error} for s in statuses]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics(state: ServiceState = Depends(_authorized)) -> Response:
        """Prometheus text: per-stage latency, batch sizes, queue depth, shed requests, versions, caches."""
        text = await asyncio.to_thread(state.metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _errors(app: FastAPI) -> None:
    def detail(field: str, message: str, kind: str) -> dict[str, Any]:
        return {"detail": [{"loc": ["body", *field.replace("]", "").split("[")], "msg": message, "type": kind}]}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(detail(exc.field, str(exc), "limit"), status_code=422)

    @app.exception_handler(UnknownIndex)
    async def unknown_index(request: Request, exc: UnknownIndex) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        # searching needs no database; listing indexes and recording feedback do
        status = 503 if exc.transient else 500
        return JSONResponse({"detail": f"the registry cannot answer: {exc}"}, status_code=status,
                            headers={"Retry-After": "5"} if exc.transient else None)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

"""Request and response bodies of the HTTP API (pydantic): what is accepted, and the OpenAPI schema.

Limits that depend on the configuration (query length, k, batch size) are checked by
:func:`check_limits`, which names the field it refuses; unknown fields, filter keys included, are refused
by the models themselves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.config import Limits

Scalar = str | int | float | bool | None


class Filters(BaseModel):
    """What a hit must satisfy: ``Retriever.search``'s filters."""

    model_config = ConfigDict(extra="forbid")

    doc_id_prefix: str | None = Field(None, description="the hit's doc_id starts with this")
    metadata: dict[str, Scalar | list[Scalar]] | None = Field(
        None, description="metadata fields the hit's document must have (a list: any of these values)")
    as_of: datetime | None = Field(None, description="only chunks visible at this time (ISO 8601)")

    def to_retrieval(self) -> dict[str, Any] | None:
        out = self.model_dump(exclude_none=True)
        return out or None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, description="the query text")
    k: int = Field(10, ge=1, description="how many hits")
    filters: Filters | None = None
    index: str | None = Field(None, description="the alias to search; default: the service's default index")
    session: str | None = Field(None, max_length=200, description="routes the request while the alias has a canary "
                                "(the same key always gets the same version); default: the X-Session-Key "
                                "header, else the request id")


class SearchManyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(..., min_length=1, description="the query texts, answered from one version")
    k: int = Field(10, ge=1)
    filters: Filters | None = None
    index: str | None = None
    session: str | None = Field(None, max_length=200, description="as in /v1/search")


class StageScoreModel(BaseModel):
    score: float | None
    rank: int | None


class HitModel(BaseModel):
    """``Hit.to_dict()`` and the character spans of ``text`` that match the query's terms."""

    doc_id: str
    chunk_id: str
    text: str
    source_uri: str
    heading_path: list[str]
    char_start: int
    char_end: int
    ordinal: int
    chunk_hash: str
    index_version: str
    alias: str
    version_updated_at: str | None
    model_id: str
    bm25: StageScoreModel
    vector: StageScoreModel
    fused: StageScoreModel
    rerank: StageScoreModel
    metadata: dict[str, Any]
    page_start: int | None = None
    page_end: int | None = None
    page_label_start: str | None = None
    page_label_end: str | None = None
    score: float
    highlights: list[list[int]] = Field(description="[start, end) character spans of text matching the query")


class Served(BaseModel):
    route: str = Field(description="live, or canary while the alias has one")
    cache: str | None = Field(None, description="exact or semantic when a result cache answered")
    similarity: float | None = Field(None, description="a semantic hit: cosine of the query to the cached one")
    cached_query: str | None = Field(None, description="a semantic hit: the query whose hits these are")


class SearchResponse(BaseModel):
    request_id: str
    index: str
    version: str = Field(description="the version every hit comes from")
    served: Served
    hits: list[HitModel]


class SearchManyResponse(BaseModel):
    request_id: str
    index: str
    version: str
    served: list[Served]
    results: list[list[HitModel]]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(..., min_length=1, max_length=64)
    chunk_id: str | None = Field(None, max_length=200, description="a hit of that response; none: the whole response")
    score: float = Field(..., ge=-1.0, le=1.0, allow_inf_nan=False)
    kind: Literal["relevance", "faithfulness", "thumbs"]
    source: Literal["user", "judge"]


class FeedbackResponse(BaseModel):
    feedback_id: int
    request_id: str
    index: str
    version: str


class FieldError(ValueError):
    """A request field beyond a limit: answered 422 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_limits(limits: Limits, queries: list[str], k: int, *, single: bool) -> None:
    """Refuse a request beyond the service's limits.

    Raises:
        FieldError: naming the field (``query``, ``queries``, ``queries[i]``, ``k``) and the limit.
    """
    if k > limits.max_k:
        raise FieldError("k", f"k is {k}; at most {limits.max_k} (RAGPIPE_SERVE_MAX_K)")
    if not single and len(queries) > limits.max_batch:
        raise FieldError("queries", f"{len(queries)} queries; at most {limits.max_batch} (RAGPIPE_SERVE_MAX_BATCH)")
    for i, text in enumerate(queries):
        if len(text) > limits.max_query_chars:
            name = "query" if single else f"queries[{i}]"
            raise FieldError(name, f"{name} has {len(text)} characters; at most {limits.max_query_chars} "
                                   "(RAGPIPE_SERVE_MAX_QUERY_CHARS)")
        if not text.strip():
            name = "query" if single else f"queries[{i}]"
            raise FieldError(name, f"{name} is blank")

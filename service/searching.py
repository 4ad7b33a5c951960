"""One batch in a search thread: the retriever's batched search, then the hits as JSON-ready dicts with
the characters that match the query marked (the page highlights them)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from retrieval.batch import Query
from retrieval.bm25 import STOPWORDS, Analyzer

_WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class Answered:
    """Hits of consecutive queries of a batch, all from ``version`` of ``alias``: each query's hits as a
    JSON array (encoded in the search thread, not on the event loop) and their chunk ids."""

    alias: str
    version: str
    hits_json: list[str]
    chunk_ids: list[tuple[str, ...]]
    route: str = "live"  # ``live`` or ``canary``: which of the alias's versions served the batch
    served_json: list[str] | None = None  # per query: how it was served (cache, similarity) as a JSON object

    def slice(self, start: int, count: int) -> "Answered":
        end = start + count
        served = self.served_json[start:end] if self.served_json is not None else None
        return Answered(self.alias, self.version, self.hits_json[start:end], self.chunk_ids[start:end], self.route,
                        served)

    def served(self, i: int) -> str:
        """``{"route", "cache", "similarity", "cached_query"}`` of query ``i`` as JSON: a ``cache`` of
        ``semantic`` means the hits are those of ``cached_query``, whose embedding is that close."""
        return self.served_json[i] if self.served_json is not None else json.dumps({"route": self.route, "cache": None})


def highlight_spans(analyzer: Analyzer, query: str, text: str) -> list[list[int]]:
    """``[start, end)`` character spans of the words of ``text`` whose BM25 term (lowercased, stemmed,
    stop words dropped) is a term of ``query``: what matched lexically."""
    wanted = set(analyzer.terms(query))
    if not wanted:
        return []
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]
    kept = [(s, e, w) for s, e, w in words if w not in STOPWORDS]
    stems = analyzer.terms(" ".join(w for _, _, w in kept)) if kept else []
    if len(stems) != len(kept):  # cannot happen for ASCII words; never mark the wrong characters
        return []
    return [[s, e] for (s, e, _), stem in zip(kept, stems) if stem in wanted]


def run_batch(retriever: Any, analyzer: Analyzer, queries: list[Query],
              route: str = "live") -> tuple[Answered, dict[str, float]]:
    """Search ``queries`` on the version the retriever serves on ``route`` (``live``, or ``canary`` while
    the alias has one); the hits of each query as a JSON array (``Hit.to_dict()`` plus ``highlights``)
    and the seconds of each stage, ``serialize`` included."""
    result = retriever.search_batch(queries, route=route)
    started = time.perf_counter()
    encoded = [json.dumps([{**hit.to_dict(), "highlights": highlight_spans(analyzer, q.text, hit.text)}
                           for hit in found], default=str) for q, found in zip(queries, result.hits)]
    chunk_ids = [tuple(hit.chunk_id for hit in found) for found in result.hits]
    served = [json.dumps({"route": getattr(found, "route", route), "cache": getattr(found, "cache", None),
                          "similarity": getattr(found, "similarity", None),
                          "cached_query": getattr(found, "cached_query", None)}) for found in result.hits]
    stages = {**result.stage_seconds, "serialize": time.perf_counter() - started}
    return Answered(result.alias, result.version, encoded, chunk_ids, route, served), stages

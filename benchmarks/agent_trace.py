"""An agent-style query trace: real queries, then the repeats and rephrasings agents send.

Agents answering one task query the index many times, repeating a query exactly or rephrasing it
slightly. The trace starts from real queries (the Cranfield queries) and derives, deterministically
from the query text and the small word lists below, the variants an agent produces: casing and
punctuation, dropped stopwords, synonyms, a changed word order, and the exact repeat. Variants are
interleaved with other sessions' queries (a seeded shuffle), so a cache sees them as a server would.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("original", "repeat", "casing", "stopwords", "synonyms", "reorder")

STOPWORDS = frozenset(
    "a an the of in on for to and or with by at from as is are was were be been being what which how "
    "there any has have do does can so far such that this these those it its".split()
)

# Aeronautics wording and the other words a person would use for it (one replacement each).
SYNONYMS = {
    "aircraft": "airplanes", "airplane": "aircraft", "speed": "velocity", "velocity": "speed",
    "investigation": "study", "study": "investigation", "problems": "issues", "problem": "issue",
    "effect": "influence", "effects": "influences", "methods": "techniques", "method": "technique",
    "determine": "find", "determining": "finding", "obtained": "found", "experimental": "measured",
    "available": "existing", "solutions": "answers", "solution": "answer", "theory": "theoretical model",
    "theoretical": "analytical", "analysis": "examination", "calculation": "computation",
    "calculating": "computing", "predicting": "forecasting", "prediction": "forecast",
    "heated": "hot", "high": "elevated", "low": "small", "flow": "stream", "flows": "streams",
    "body": "object", "bodies": "objects", "surface": "skin", "models": "replicas", "data": "measurements",
    "results": "findings", "papers": "articles", "work": "research", "shape": "form", "layer": "film",
    "wing": "aerofoil wing", "wings": "aerofoil wings", "transfer": "transport", "conduction": "conductance",
    "structural": "structure", "associated": "connected", "constructing": "building", "obeyed": "followed",
    "similarity": "similitude", "laws": "rules", "pressure": "pressures", "distribution": "spread",
}

_SPLIT_WORDS = ("of", "in", "for", "on", "with", "at")


@dataclass(frozen=True)
class TraceQuery:
    """One query of the trace: its text, what it derives from, and how."""

    session: int
    text: str
    source_id: str  # the id of the real query it was derived from
    kind: str


def load_queries(cranfield: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, text) of the Cranfield queries in file order."""
    rows = [json.loads(line) for line in open(cranfield / "queries.jsonl", encoding="utf-8")]
    return [(str(r["_id"]), str(r["text"])) for r in rows][:limit]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9\-]*", text.lower())


def casing(text: str) -> str:
    """Sentence case, the trailing ' .' as a question mark."""
    body = text.strip().rstrip(".").strip()
    return body[:1].upper() + body[1:] + "?"


def drop_stopwords(text: str) -> str:
    """The query as keywords: stopwords dropped (the text itself when nothing would remain)."""
    kept = [w for w in _words(text) if w not in STOPWORDS]
    return " ".join(kept) or text


def synonyms(text: str) -> str:
    """Every word of :data:`SYNONYMS` replaced by its synonym."""
    return " ".join(SYNONYMS.get(w, w) for w in _words(text))


def reorder(text: str) -> str:
    """The two halves around the middle preposition swapped ("heat transfer in laminar flow" →
    "laminar flow heat transfer"); else the first two words moved to the end."""
    words = _words(text)
    splits = [i for i, w in enumerate(words) if w in _SPLIT_WORDS and 0 < i < len(words) - 1]
    if splits:
        i = min(splits, key=lambda j: abs(j - len(words) / 2))
        return " ".join(words[i + 1:] + words[:i])
    return " ".join(words[2:] + words[:2]) if len(words) > 2 else text


REPHRASE = {"casing": casing, "stopwords": drop_stopwords, "synonyms": synonyms, "reorder": reorder}


def build_trace(queries: list[tuple[str, str]], *, seed: int = 0, sessions: int = 8) -> list[TraceQuery]:
    """Each real query once as asked, then its exact repeat and its four rephrasings, all in one
    session; sessions' queries interleaved by a seeded shuffle that keeps each session's order
    (the original first)."""
    rng = random.Random(seed)
    per_session: list[list[TraceQuery]] = [[] for _ in range(sessions)]
    for n, (qid, text) in enumerate(queries):
        session = n % sessions
        items = [TraceQuery(session, text, qid, "original")]
        variants = [TraceQuery(session, text, qid, "repeat")]
        variants += [TraceQuery(session, fn(text), qid, kind) for kind, fn in REPHRASE.items()]
        rng.shuffle(variants)
        per_session[session].extend(items + variants)
    trace: list[TraceQuery] = []
    cursors = [0] * sessions
    while any(cursors[s] < len(per_session[s]) for s in range(sessions)):
        s = rng.choice([s for s in range(sessions) if cursors[s] < len(per_session[s])])
        trace.append(per_session[s][cursors[s]])
        cursors[s] += 1
    return trace


__all__ = ["KINDS", "REPHRASE", "SYNONYMS", "TraceQuery", "build_trace", "load_queries"]

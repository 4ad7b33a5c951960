"""Boundary stability: how many chunks one edit of heading-less text re-cuts, ragpipe beside
LangChain's RecursiveCharacterTextSplitter and LlamaIndex's SentenceSplitter.

The corpus is built from the Cranfield abstracts (``shared/data/cranfield``): in corpus order, every
``--per-document`` abstracts (title line dropped) become one plain-text document, one abstract a
paragraph — text without headings, as most PDF-extracted text is. Then ``--edits`` seeded edits of
each kind are applied, each to the unedited corpus:

- ``sentence_added``: a sentence of another abstract inserted at a sentence boundary of a paragraph;
- ``paragraph_deleted``: one paragraph removed;
- ``paragraph_inserted``: an abstract of another document inserted as a new paragraph.

For every edit the document is split before and after. The **new** chunks are those of the edited
document whose text the unedited one did not have (what a content-addressed index embeds again);
the chunks **re-cut** are the new chunks that hold any text of the unedited document, i.e. all but
those made of inserted text alone (an inserted paragraph longer than a chunk needs chunks of its
own whatever the splitter). Reported per tool and kind: the worst edit, the mean, the 99th
percentile and how many edits re-cut more than 3 chunks, and the same for new chunks.

    python -m benchmarks stability [--edits 300] [--per-document 25] [--seed 15] [--tools ...]

Tools: ``ragpipe`` (chunk_document, the model's tokenizer, 254 tokens), ``langchain``
(RecursiveCharacterTextSplitter, 1,000 characters, no overlap), ``llamaindex`` (SentenceSplitter,
254 of the model's tokens, no overlap); the last two need the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import shared_data_dir

MAX_TOKENS = 254
LANGCHAIN_CHARS = 1000
KINDS = ("sentence_added", "paragraph_deleted", "paragraph_inserted")
TOOLS = ("ragpipe", "langchain", "llamaindex")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")

Splitter = Callable[[str], list[str]]


@dataclass(frozen=True)
class Edit:
    kind: str
    document: int
    before: str
    after: str


def abstracts(cranfield: Path) -> list[str]:
    """The Cranfield abstracts in corpus order, whitespace-collapsed, empty ones left out."""
    out = []
    with open(cranfield / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            text = " ".join((json.loads(line).get("text") or "").split())
            if text:
                out.append(text)
    return out


def build_corpus(paragraphs: Sequence[str], per_document: int) -> list[list[str]]:
    """Documents of ``per_document`` consecutive paragraphs each (the last may hold fewer)."""
    return [list(paragraphs[i : i + per_document]) for i in range(0, len(paragraphs), per_document)]


def render(paragraphs: Sequence[str]) -> str:
    return "\n\n".join(paragraphs) + "\n"


def make_edits(corpus: list[list[str]], edits_per_kind: int, seed: int) -> list[Edit]:
    """Seeded edits, ``edits_per_kind`` of each kind, each applied to the unedited corpus."""
    rng = random.Random(seed)
    pool = [p for doc in corpus for p in doc]
    out = []
    for kind in KINDS:
        for _ in range(edits_per_kind):
            d = rng.randrange(len(corpus))
            paragraphs = list(corpus[d])
            p = rng.randrange(len(paragraphs))
            if kind == "sentence_added":
                sentences = _SENTENCE.split(paragraphs[p])
                donor = _SENTENCE.split(rng.choice(pool))
                sentences.insert(rng.randint(0, len(sentences)), rng.choice(donor))
                paragraphs[p] = " ".join(sentences)
            elif kind == "paragraph_deleted":
                if len(paragraphs) < 2:
                    continue
                del paragraphs[p]
            else:
                other = rng.choice([i for i in range(len(corpus)) if i != d] or [d])
                paragraphs.insert(rng.randint(0, len(paragraphs)), rng.choice(corpus[other]))
            out.append(Edit(kind, d, render(corpus[d]), render(paragraphs)))
    return out


def inserted_span(before: str, after: str) -> tuple[int, int]:
    """The span of ``after`` that an edit inserted: what lies between the texts' common prefix and
    common suffix (empty for a deletion)."""
    prefix = 0
    while prefix < min(len(before), len(after)) and before[prefix] == after[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(before), len(after)) - prefix and before[-1 - suffix] == after[-1 - suffix]:
        suffix += 1
    return prefix, len(after) - suffix


def new_and_recut(before_text: str, after_text: str, before: Sequence[str], after: Sequence[str]) -> tuple[int, int]:
    """(new chunks, re-cut chunks) of an edit: chunks of ``after`` whose text ``before`` did not have,
    and those of them that hold any character outside the inserted span. A chunk is found in the
    text after the previous one; one that is not found (a splitter that rewrites text) counts as re-cut."""
    fresh = Counter(after) - Counter(before)
    start, end = inserted_span(before_text, after_text)
    new = recut = pos = 0
    for chunk in after:
        at = after_text.find(chunk, pos)
        if at >= 0:
            pos = at + len(chunk)
        if fresh[chunk] > 0:
            fresh[chunk] -= 1
            new += 1
            inside = at >= 0 and start <= at and at + len(chunk) <= end
            recut += not inside
    return new, recut


def _tokenizer() -> Any:
    from benchmarks.replay import _tokenizer as model_tokenizer

    return model_tokenizer()


def splitters(tools: Sequence[str]) -> dict[str, Splitter]:
    """Each tool's splitter: text in, chunk texts out."""
    out: dict[str, Splitter] = {}
    for tool in tools:
        if tool == "ragpipe":
            from pipeline.chunking import chunk_document
            from pipeline.deterministic import DeterministicEmbedder
            from pipeline.sources import make_document

            counter = DeterministicEmbedder().token_counter()

            def split_ragpipe(text: str, counter: Any = counter) -> list[str]:
                doc = make_document("d.txt", text, "stability")
                return [c.text for c in chunk_document(doc, counter, MAX_TOKENS)]  # type: ignore[arg-type]

            out[tool] = split_ragpipe
        elif tool == "langchain":
            from langchain_text_splitters import RecursiveCharacterTextSplitter

            out[tool] = RecursiveCharacterTextSplitter(chunk_size=LANGCHAIN_CHARS, chunk_overlap=0).split_text
        elif tool == "llamaindex":
            from llama_index.core.node_parser import SentenceSplitter

            splitter = SentenceSplitter(chunk_size=MAX_TOKENS, chunk_overlap=0, tokenizer=_tokenizer().tokenize)
            out[tool] = splitter.split_text
        else:
            raise SystemExit(f"unknown tool {tool!r}: one of {', '.join(TOOLS)}")
    return out


def measure(split: Splitter, corpus: list[list[str]], edits: Sequence[Edit]) -> dict[str, Any]:
    """Re-cut chunks per edit kind for one splitter, and its chunks of the unedited corpus."""
    started = time.perf_counter()
    memo: dict[str, list[str]] = {}

    def chunks(text: str) -> list[str]:
        if text not in memo:
            memo[text] = split(text)
        return memo[text]

    base = [chunks(render(doc)) for doc in corpus]
    sizes = [len(c) for doc in base for c in doc]
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        pairs = [new_and_recut(e.before, e.after, chunks(e.before), chunks(e.after)) for e in edits if e.kind == kind]
        kinds[kind] = {"edits": len(pairs), "recut": _summary([r for _, r in pairs]),
                       "new": _summary([n for n, _ in pairs])}
    return {
        "chunks": len(sizes), "mean_chunk_chars": round(statistics.mean(sizes), 1),
        "recut_max": max(k["recut"]["max"] for k in kinds.values()),
        "new_max": max(k["new"]["max"] for k in kinds.values()), "kinds": kinds,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _summary(counts: list[int]) -> dict[str, Any]:
    ordered = sorted(counts)
    return {"max": ordered[-1], "mean": round(statistics.mean(ordered), 3),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "over_3": sum(1 for c in ordered if c > 3),
            "histogram": {str(k): v for k, v in sorted(Counter(ordered).items())}}


def run(cranfield: Path, tools: Sequence[str], edits_per_kind: int, per_document: int, seed: int) -> dict[str, Any]:
    corpus = build_corpus(abstracts(cranfield), per_document)
    edits = make_edits(corpus, edits_per_kind, seed)
    return {
        "benchmark": "stability", "corpus": str(cranfield), "documents": len(corpus),
        "paragraphs": sum(len(d) for d in corpus), "characters": sum(len(render(d)) for d in corpus),
        "edits_per_kind": edits_per_kind, "seed": seed,
        "results": {tool: measure(split, corpus, edits) for tool, split in splitters(tools).items()},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks stability", description=__doc__.split("\n")[0])
    parser.add_argument("--shared-data", type=Path)
    parser.add_argument("--edits", type=int, default=300, help="edits of each kind")
    parser.add_argument("--per-document", type=int, default=25, help="abstracts per document")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--tools", default=",".join(TOOLS))
    args = parser.parse_args(argv)
    cranfield = shared_data_dir(args.shared_data) / "cranfield"
    print(json.dumps(run(cranfield, args.tools.split(","), args.edits, args.per_document, args.seed), indent=2))
    return 0

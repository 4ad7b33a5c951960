"""Two retrieval sets built from the PEPs (``shared/data/peps-replay/base.jsonl``), in the BEIR layout
``ragpipe eval`` reads, to measure what chunks are indexed with (``--chunk-context``):

- ``peps-headings``: documents with real headings. The corpus is the PEPs that have sections with
  distinctive titles (reStructuredText, ``"format": "rst"``, the PEP's ``Title:`` as title); each
  query is the title of one section (at least three words, found in no other PEP of the set, none
  of the titles every PEP shares) and judges that PEP relevant. A section's title is in its first
  chunk's text whatever the context; with heading context every chunk of the section says it.
- ``peps-abstracts``: a CISI-style set (short flat abstracts, natural-language requests, no
  headings; the CISI collection itself is not in ``shared/data``): each document is the body of a
  PEP's ``Abstract`` section as plain text without title, each query is that PEP's title, judging
  it relevant.

Queries and judgements are kept in ``benchmarks/data/NAME/`` (``queries.jsonl``, ``qrels/test.tsv``);
the corpus is rebuilt from the shared data (which stays out of the repository), and the builder
checks that the queries it derives are the ones kept::

    python -m benchmarks evalsets --out /tmp/evalsets        # then: ragpipe eval /tmp/evalsets/peps-headings
    python -m benchmarks evalsets --out /tmp/evalsets --write  # rewrite benchmarks/data from the PEPs
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import shared_data_dir

KEPT = Path(__file__).resolve().parent / "data"
MAX_DOCUMENTS = 120  # the headings set's corpus: embedding it with the real model takes a few minutes
MAX_QUERIES_PER_DOCUMENT = 2
# section titles most PEPs share: a query made of one judges no PEP in particular
COMMON = {"abstract", "motivation", "rationale", "specification", "copyright", "references", "footnotes",
          "backwards compatibility", "backward compatibility", "security implications", "how to teach this",
          "reference implementation", "rejected ideas", "open issues", "acknowledgements", "acknowledgments",
          "implementation", "discussion", "examples", "introduction", "summary", "alternatives", "resolution"}
_TITLE = re.compile(r"^Title:\s*(.+)$", re.M)

Set = tuple[list[dict[str, Any]], list[dict[str, str]], list[tuple[str, str, int]]]


def load_peps(shared: Path) -> list[tuple[str, str, str]]:
    """(doc_id, title, text) of every PEP at the replay's base commit, in file order."""
    out = []
    with open(shared / "peps-replay" / "base.jsonl", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            m = _TITLE.search(record["text"])
            out.append((record["doc_id"], " ".join(m.group(1).split()) if m else "", record["text"]))
    return out


def _sections(text: str) -> list[tuple[tuple[str, ...], str]]:
    from pipeline.sections import rst_sections

    return [(s.heading_path, text[s.body_start : s.end]) for s in rst_sections(text)]


def headings_set(peps: Sequence[tuple[str, str, str]]) -> Set:
    owners: dict[str, set[str]] = defaultdict(set)
    titles: dict[str, list[str]] = {}
    for doc_id, _, text in peps:
        found = []
        for path, body in _sections(text):
            if path and len(body.split()) >= 40:  # a section with something to find beyond its title
                found.append(" ".join(path[-1].split()))
        titles[doc_id] = found
        for title in found:
            owners[title.lower()].add(doc_id)

    def distinctive(title: str) -> bool:
        return (len(re.findall(r"[A-Za-z]+", title)) >= 3 and title.lower() not in COMMON
                and len(owners[title.lower()]) == 1 and not re.search(r"\bPEP\b", title))

    chosen = [(d, t, x) for d, t, x in peps if t and any(distinctive(s) for s in titles[d])][:MAX_DOCUMENTS]
    corpus = [{"_id": d, "title": t, "text": x, "format": "rst"} for d, t, x in chosen]
    queries, qrels = [], []
    for doc_id, _, _ in chosen:
        for title in [s for s in dict.fromkeys(titles[doc_id]) if distinctive(s)][:MAX_QUERIES_PER_DOCUMENT]:
            qid = f"h{len(queries) + 1}"
            queries.append({"_id": qid, "text": title})
            qrels.append((qid, doc_id, 1))
    return corpus, queries, qrels


def abstracts_set(peps: Sequence[tuple[str, str, str]]) -> Set:
    corpus, queries, qrels = [], [], []
    for doc_id, title, text in peps:
        body = next((b for p, b in _sections(text) if p == ("Abstract",)), "")
        body = "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip())
        if not title or len(body.split()) < 20:
            continue
        corpus.append({"_id": doc_id, "title": "", "text": body})
        qid = f"a{len(queries) + 1}"
        queries.append({"_id": qid, "text": title})
        qrels.append((qid, doc_id, 1))
    return corpus, queries, qrels


def _lines(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _qrels(rows: Sequence[tuple[str, str, int]]) -> str:
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows)


def build(shared: Path, out: Path, write_kept: bool = False) -> dict[str, Any]:
    """Write both sets under ``out``; raise SystemExit when the derived queries differ from the kept ones."""
    peps = load_peps(shared)
    summary = {}
    for name, (corpus, queries, qrels) in {"peps-headings": headings_set(peps),
                                          "peps-abstracts": abstracts_set(peps)}.items():
        files = {"queries.jsonl": _lines(queries), "qrels/test.tsv": _qrels(qrels)}
        for rel, content in files.items():
            kept = KEPT / name / rel
            if write_kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(content, encoding="utf-8")
            elif not kept.is_file() or kept.read_text(encoding="utf-8") != content:
                raise SystemExit(f"{kept} differs from what the PEPs give; rerun with --write to update it")
            target = out / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        (out / name / "corpus.jsonl").write_text(_lines(corpus), encoding="utf-8")
        summary[name] = {"documents": len(corpus), "queries": len(queries), "path": str(out / name)}
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks evalsets", description=__doc__.split("\n")[0])
    parser.add_argument("--shared-data", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where the BEIR-layout sets are written")
    parser.add_argument("--write", action="store_true", help="rewrite the kept queries and judgements")
    args = parser.parse_args(argv)
    print(json.dumps(build(shared_data_dir(args.shared_data), args.out, args.write), indent=2))
    return 0

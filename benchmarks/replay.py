"""Replay benchmark: the PEPs edit history through ragpipe, LangChain's indexing API and LlamaIndex's
IngestionPipeline, with one counting embedder, in one run.

Every tool starts empty, indexes the base documents, then applies the 200 recorded steps; after each
step, what its store holds is compared with a fresh build of the current documents by the same tool
(same splitter, same settings): ``stale`` entries are held but not in the fresh build, ``missing``
entries the other way round. Then a no-op re-run over the unchanged corpus is timed.

How each tool is driven, in the mode that keeps it correct:

- **ragpipe**: one ``run_index`` per step over the whole current corpus (it finds the changes itself).
- **LangChain** ``index()`` with a ``SQLRecordManager`` (SQLite) and an ``InMemoryVectorStore``: the
  documents a step upserts are split and indexed with ``cleanup="scoped_full"``; a step that deletes
  indexes the whole corpus with ``cleanup="full"``, the only mode that removes a deleted source. The
  no-op re-run is the full pass (load, split, hash, look up; nothing to embed). Two variants: chunks
  carry their character offset (``add_start_index=True``; the offset is part of LangChain's hash) or
  carry none.
- **LlamaIndex** ``IngestionPipeline`` with a ``SimpleDocumentStore``, a ``SimpleVectorStore`` and
  ``DocstoreStrategy.UPSERTS_AND_DELETE``: every step runs the whole corpus (the strategy deletes
  what it is not given).

Chunk sizes are comparable: every splitter counts the embedding model's own tokens, at most 254 per
chunk, no overlap. The counting embedder is the deterministic one (feature hashing): each tool's
embedding calls are counted in texts and characters. Times exclude the comparisons with fresh builds.
Requires the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.deterministic import DeterministicEmbedder
from pipeline.replay import Documents, load_replay, run_replay

MAX_TOKENS = 254


class CountingEmbedder(DeterministicEmbedder):
    """The deterministic embedder, also counting the characters it is asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.chars_embedded = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.chars_embedded += sum(len(t) for t in texts)
        return super().embed(texts)

    def counts(self) -> tuple[int, int]:
        return self.texts_embedded, self.chars_embedded


def _apply(docs: Documents, changes: Iterable[dict[str, Any]]) -> tuple[list[str], bool]:
    """Apply one step's changes to ``docs``; return the upserted doc ids and whether any was deleted."""
    upserted, deleted = [], False
    for change in changes:
        if change["op"] == "delete":
            docs.pop(change["doc_id"], None)
            deleted = True
        else:
            docs[change["doc_id"]] = (change["text"], change.get("metadata") or {})
            upserted.append(change["doc_id"])
    return upserted, deleted


def _compare(held: set[Any], fresh: set[Any]) -> dict[str, int]:
    return {"stale": len(held - fresh), "missing": len(fresh - held)}


class Peer:
    """A peer tool driven through the replay; subclasses implement the four operations."""

    name = ""

    def __init__(self, embedder: CountingEmbedder, workdir: Path) -> None:
        self.embedder = embedder
        self.workdir = workdir
        self._split_memo: dict[tuple[str, str], set[Any]] = {}

    def index_base(self, docs: Documents) -> None: ...

    def step(self, docs: Documents, upserted: list[str], deleted: bool) -> None: ...

    def noop(self, docs: Documents) -> None: ...

    def held(self) -> set[Any]: ...

    def fresh_entries(self, doc_id: str, text: str) -> set[Any]: ...

    def fresh(self, docs: Documents) -> set[Any]:
        out: set[Any] = set()
        for doc_id, (text, _) in docs.items():
            key = (doc_id, text)
            if key not in self._split_memo:
                self._split_memo[key] = self.fresh_entries(doc_id, text)
            out |= self._split_memo[key]
        return out


def _tokenizer() -> Any:
    """The embedding model's tokenizer, which every splitter counts in."""
    from transformers import AutoTokenizer

    from pipeline.embedding import DEFAULT_MODEL, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL)[1])


class LangChainPeer(Peer):
    def __init__(self, embedder: CountingEmbedder, workdir: Path, offsets: bool) -> None:
        super().__init__(embedder, workdir)
        from langchain_classic.indexes import SQLRecordManager
        from langchain_core.embeddings import Embeddings
        from langchain_core.vectorstores import InMemoryVectorStore
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        inner = embedder

        class Counting(Embeddings):
            def embed_documents(self, texts: list[str]) -> list[list[float]]:
                return inner.embed(texts).tolist()

            def embed_query(self, text: str) -> list[float]:
                return inner.embed([text])[0].tolist()

        self.offsets = offsets
        self.name = "LangChain index(), offsets in metadata" if offsets else "LangChain index(), no offsets"
        self.records = SQLRecordManager(f"peps-{int(offsets)}", db_url=f"sqlite:///{workdir}/records-{int(offsets)}.sqlite")
        self.records.create_schema()
        self.store = InMemoryVectorStore(embedding=Counting())
        self.splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            _tokenizer(), chunk_size=MAX_TOKENS, chunk_overlap=0, add_start_index=offsets)

    def _split(self, items: Iterable[tuple[str, str]]) -> list[Any]:
        from langchain_core.documents import Document

        return self.splitter.split_documents([Document(page_content=t, metadata={"source": d}) for d, t in items])

    def _index(self, chunks: list[Any], cleanup: str) -> dict[str, int]:
        from langchain_core.indexing import index

        return index(chunks, self.records, self.store, cleanup=cleanup, source_id_key="source", key_encoder="sha256")

    def index_base(self, docs: Documents) -> None:
        self._index(self._split((d, t) for d, (t, _) in docs.items()), "full")

    def step(self, docs: Documents, upserted: list[str], deleted: bool) -> None:
        if deleted:
            self.noop(docs)
        else:
            self._index(self._split((d, docs[d][0]) for d in upserted), "scoped_full")

    def noop(self, docs: Documents) -> None:
        self._index(self._split((d, t) for d, (t, _) in docs.items()), "full")

    def _entry(self, metadata: dict[str, Any], text: str) -> tuple[Any, ...]:
        return (metadata["source"], metadata.get("start_index"), text)

    def held(self) -> set[Any]:
        return {self._entry(e["metadata"], e["text"]) for e in self.store.store.values()}

    def fresh_entries(self, doc_id: str, text: str) -> set[Any]:
        return {self._entry(c.metadata, c.page_content) for c in self._split([(doc_id, text)])}


class LlamaIndexPeer(Peer):
    name = "LlamaIndex IngestionPipeline, UPSERTS_AND_DELETE"

    def __init__(self, embedder: CountingEmbedder, workdir: Path) -> None:
        super().__init__(embedder, workdir)
        from llama_index.core.embeddings import BaseEmbedding
        from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.core.storage.docstore import SimpleDocumentStore
        from llama_index.core.vector_stores import SimpleVectorStore

        inner = embedder

        class Counting(BaseEmbedding):
            def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
                return inner.embed(texts).tolist()

            def _get_text_embedding(self, text: str) -> list[float]:
                return self._get_text_embeddings([text])[0]

            def _get_query_embedding(self, query: str) -> list[float]:
                return self._get_text_embeddings([query])[0]

            async def _aget_query_embedding(self, query: str) -> list[float]:
                return self._get_query_embedding(query)

        held: dict[str, tuple[str, str]] = {}  # node id -> (document id, text): what the vector store holds

        class Recording(SimpleVectorStore):
            """The in-memory vector store, keeping each node's text so the benchmark can read it back."""

            def add(self, nodes: Sequence[Any], **kwargs: Any) -> list[str]:
                for node in nodes:
                    held[node.node_id] = (node.ref_doc_id, node.get_content())
                return super().add(nodes, **kwargs)

            def delete(self, ref_doc_id: str, **kwargs: Any) -> None:
                for node_id in [n for n, (d, _) in held.items() if d == ref_doc_id]:
                    del held[node_id]
                super().delete(ref_doc_id, **kwargs)

        tokenizer = _tokenizer()
        self.splitter = SentenceSplitter(chunk_size=MAX_TOKENS, chunk_overlap=0, tokenizer=tokenizer.tokenize)
        self.vector_store = Recording()
        self._held = held
        self.pipeline = IngestionPipeline(
            transformations=[self.splitter, Counting(model_name=inner.model_id, embed_batch_size=64)],
            docstore=SimpleDocumentStore(), vector_store=self.vector_store,
            docstore_strategy=DocstoreStrategy.UPSERTS_AND_DELETE)

    def _documents(self, items: Iterable[tuple[str, str]]) -> list[Any]:
        from llama_index.core import Document

        return [Document(text=t, id_=d) for d, t in items]

    def index_base(self, docs: Documents) -> None:
        self.noop(docs)

    def step(self, docs: Documents, upserted: list[str], deleted: bool) -> None:
        self.noop(docs)

    def noop(self, docs: Documents) -> None:
        self.pipeline.run(documents=self._documents((d, t) for d, (t, _) in docs.items()))

    def held(self) -> set[Any]:
        stored = set(self.vector_store.data.embedding_dict)
        assert stored == set(self._held), "the recording lost track of the vector store"
        return set(self._held.values())

    def fresh_entries(self, doc_id: str, text: str) -> set[Any]:
        return {(doc_id, n.get_content()) for n in self.splitter.get_nodes_from_documents(self._documents([(doc_id, text)]))}


def run_peer(peer: Peer, replay_dir: Path, max_steps: int | None) -> dict[str, Any]:
    docs, steps = load_replay(replay_dir)
    numbers = list(steps)[:max_steps]
    embedder = peer.embedder
    started = time.perf_counter()
    peer.index_base(docs)
    base_seconds = time.perf_counter() - started
    base_texts, base_chars = embedder.counts()
    checks, indexing = [], 0.0
    for number in numbers:
        upserted, deleted = _apply(docs, steps[number])
        started = time.perf_counter()
        peer.step(docs, upserted, deleted)
        indexing += time.perf_counter() - started
        checks.append({"step": number, **_compare(peer.held(), peer.fresh(docs))})
    texts, chars = embedder.counts()
    started = time.perf_counter()
    peer.noop(docs)
    noop_seconds = time.perf_counter() - started
    assert embedder.counts() == (texts, chars), f"{peer.name}: the no-op run embedded something"
    final = peer.fresh(docs)
    return {
        "tool": peer.name, "steps": len(numbers),
        "embeddings_base": base_texts, "chars_base": base_chars,
        "embeddings_replay": texts - base_texts, "chars_replay": chars - base_chars,
        "stale_max": max(c["stale"] for c in checks), "missing_max": max(c["missing"] for c in checks),
        "steps_with_stale_or_missing": sum(1 for c in checks if c["stale"] or c["missing"]),
        "final_chunks": len(final), "mean_chunk_chars": round(sum(len(e[-1]) for e in final) / len(final), 1),
        "base_seconds": round(base_seconds, 2), "replay_seconds": round(indexing, 2),
        "total_seconds": round(base_seconds + indexing, 2), "noop_seconds": round(noop_seconds, 4),
    }


def run_ragpipe(replay_dir: Path, max_steps: int | None, registry_config: Any) -> dict[str, Any]:
    embedder = CountingEmbedder()
    result = run_replay(replay_dir, registry_config, embedder, check_every=1, max_steps=max_steps)
    # the chunk table of the final state, for the mean chunk size
    docs, steps = load_replay(replay_dir)
    for number in list(steps)[:max_steps]:
        _apply(docs, steps[number])
    from pipeline.chunking import chunk_document
    from pipeline.sources import scan_records

    counter = embedder.token_counter()
    scan = scan_records(((d, t, m) for d, (t, m) in docs.items()), "replay")
    sizes = [len(c.text) for doc in scan.documents for c in chunk_document(doc, counter, embedder.max_tokens)]
    checks = result["checks"]
    return {
        "tool": "ragpipe", "steps": result["steps"],
        "embeddings_base": result["chunks_embedded_base"], "chars_base": result["chars_embedded_base"],
        "embeddings_replay": result["chunks_embedded_replay"], "chars_replay": result["chars_embedded_replay"],
        "stale_max": result["stale"], "missing_max": result["missing"],
        "steps_with_stale_or_missing": sum(1 for c in checks if c["stale"] or c["missing"]),
        "active_chunks_of_deleted_documents": result["active_chunks_of_deleted_documents"],
        "final_chunks": result["final_chunks"], "mean_chunk_chars": round(sum(sizes) / len(sizes), 1),
        "total_seconds": round(result["total_seconds"] - result["check_seconds"] - result["noop_seconds"], 2),
        "noop_seconds": result["noop_seconds"], "noop_stage_seconds": result["noop_stage_seconds"],
    }


TOOLS = ("ragpipe", "langchain-offsets", "langchain", "llamaindex")


def run(replay_dir: Path, tools: Sequence[str], max_steps: int | None, registry_config: Any) -> dict[str, Any]:
    results = []
    for tool in tools:
        if tool == "ragpipe":
            results.append(run_ragpipe(replay_dir, max_steps, registry_config))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="ragpipe-peer-") as tmp:
            embedder = CountingEmbedder()
            peer: Peer = (LlamaIndexPeer(embedder, Path(tmp)) if tool == "llamaindex"
                          else LangChainPeer(embedder, Path(tmp), offsets=tool == "langchain-offsets"))
            results.append(run_peer(peer, replay_dir, max_steps))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    by_tool = {r["tool"]: r for r in results}
    ours = by_tool.get("ragpipe")
    if ours:
        for r in results:
            if r is not ours and r["chars_replay"]:
                r["ragpipe_chars_ratio"] = round(ours["chars_replay"] / r["chars_replay"], 3)
            if r is not ours and ours["noop_seconds"]:
                r["noop_vs_ragpipe"] = round(r["noop_seconds"] / ours["noop_seconds"], 1)
    versions = {}
    for package in ("langchain-core", "langchain-classic", "langchain-text-splitters", "llama-index-core"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            pass
    return {"benchmark": "replay", "replay_dir": str(replay_dir), "max_tokens": MAX_TOKENS, "results": results,
            "packages": versions, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "python": sys.version.split()[0], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks replay", description=__doc__.split("\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    parser.add_argument("--shared-data", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    from registry import RegistryConfig

    replay_dir = shared_data_dir(args.shared_data) / "peps-replay"
    print(json.dumps(run(replay_dir, tools, args.steps, RegistryConfig.from_env()), indent=2))
    return 0

"""Replay: feed a recorded edit history through the incremental pipeline and check it after each step.

The layout is that of a replay directory: ``base.jsonl`` (``doc_id``, ``text``) and ``changes.jsonl``
(``step``, ``doc_id``, ``op`` = upsert | delete, ``text``). Each step is applied as one incremental
run. Every ``check_every`` steps and after the last, the registry's active chunks are compared with
a fresh full chunking of the current documents: ``stale`` chunks are active but not in the fresh
build, ``missing`` chunks the other way round.

The replay runs in a database of its own (created on the configured server and dropped afterwards)
and writes its versions to a temporary directory, so that its embedding counts start from an empty
cache and never touch real indexes.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.chunking import DEFAULT_CONTEXT, chunk_document
from pipeline.config import IndexConfig
from pipeline.embedding import Embedder, prefixes_of
from pipeline.errors import ConfigError
from pipeline.runner import run_index
from pipeline.sources import scan_records
from registry import Registry, RegistryConfig
from registry.db import scratch_database

logger = logging.getLogger(__name__)

Documents = dict[str, tuple[str, dict[str, Any]]]


def load_replay(replay_dir: Path) -> tuple[Documents, dict[int, list[dict[str, Any]]]]:
    """Read base documents and the changes grouped by step."""
    base_path, changes_path = replay_dir / "base.jsonl", replay_dir / "changes.jsonl"
    for path in (base_path, changes_path):
        if not path.is_file():
            raise ConfigError(f"replay directory {replay_dir} has no {path.name}")
    docs: Documents = {}
    with open(base_path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                docs[record["doc_id"]] = (record["text"], record.get("metadata") or {})
    steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    with open(changes_path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                steps[int(record["step"])].append(record)
    return docs, dict(sorted(steps.items()))


def check_against_fresh_build(registry: Registry, index: str, docs: Documents, embedder: Embedder,
                              memo: dict[tuple[str, str, str], set[str]] | None = None,
                              chunk_context: str = DEFAULT_CONTEXT) -> dict[str, int]:
    """Compare the registry's active chunks with a full chunking of ``docs``.

    ``memo`` keeps each document's fresh chunk ids by (doc_id, text, metadata) between checks of one
    replay: chunking is deterministic, so a document the check has seen before is not chunked again.
    """
    counter = embedder.token_counter()
    passage = prefixes_of(embedder).passage
    memo = {} if memo is None else memo
    expected: set[str] = set()
    for doc_id, (text, metadata) in docs.items():
        key = (doc_id, text, json.dumps(metadata, sort_keys=True))
        ids = memo.get(key)
        if ids is None:
            scan = scan_records([(doc_id, text, metadata)], "replay")
            ids = memo[key] = {c.chunk_id for d in scan.documents
                                  for c in chunk_document(d, counter, embedder.max_tokens, passage, chunk_context)}
        expected |= ids
    active = registry.active_chunk_ids(index)
    return {
        "stale": len(active - expected),
        "missing": len(expected - active),
        "active_chunks_of_deleted_documents": registry.active_chunks_of_deleted_documents(index),
    }


def run_replay(
    replay_dir: Path,
    registry_config: RegistryConfig,
    embedder: Embedder,
    *,
    check_every: int = 10,
    max_steps: int | None = None,
    keep_database: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    chunk_context: str = DEFAULT_CONTEXT,
) -> dict[str, Any]:
    """Replay ``replay_dir`` and return the counts ``ragpipe replay --json`` prints."""
    if check_every < 1:
        raise ConfigError(f"check_every must be at least 1, got {check_every}")
    docs, steps = load_replay(replay_dir)
    step_numbers = list(steps)[:max_steps] if max_steps is not None else list(steps)
    artifacts = tempfile.TemporaryDirectory(prefix="ragpipe-replay-")
    config = IndexConfig(index="replay", lock_timeout=0, artifacts=artifacts.name, retention=2,
                         chunk_context=chunk_context)
    source = replay_dir.resolve().as_uri()
    started = time.perf_counter()

    def scan() -> Any:
        return scan_records(((d, t, m) for d, (t, m) in docs.items()), source)

    with scratch_database(registry_config.database_url, registry_config.home, keep_database) as url:
        with Registry.open(RegistryConfig(database_url=url, home=registry_config.home)) as registry:
            base = run_index(scan(), registry, embedder, config)
            result: dict[str, Any] = {
                "replay_dir": str(replay_dir),
                "model_id": embedder.model_id,
                "base_documents": base.documents["seen"],
                "base_chunks": base.chunks["active"],
                "chunks_embedded_base": base.embedding["chunks_embedded"],
                "chars_embedded_base": base.embedding["chars_embedded"],
                "steps": len(step_numbers),
                "chunks_embedded_replay": 0,
                "chars_embedded_replay": 0,
                "chunks_added_replay": 0,
                "documents_upserted": 0,
                "documents_deleted": 0,
                "checks": [],
            }
            memo: dict[tuple[str, str, str], set[str]] = {}
            check_seconds = 0.0
            for position, step in enumerate(step_numbers, start=1):
                for change in steps[step]:
                    if change["op"] == "delete":
                        docs.pop(change["doc_id"], None)
                        result["documents_deleted"] += 1
                    else:
                        docs[change["doc_id"]] = (change["text"], change.get("metadata") or {})
                        result["documents_upserted"] += 1
                summary = run_index(scan(), registry, embedder, config)
                result["chunks_embedded_replay"] += summary.embedding["chunks_embedded"]
                result["chars_embedded_replay"] += summary.embedding["chars_embedded"]
                result["chunks_added_replay"] += summary.chunks["added"]
                if position % check_every == 0 or position == len(step_numbers):
                    check_started = time.perf_counter()
                    check = {"step": step, **check_against_fresh_build(registry, config.index, docs, embedder, memo,
                                                                         chunk_context)}
                    check_seconds += time.perf_counter() - check_started
                    result["checks"].append(check)
                    if on_step:
                        on_step(step, check)
            noop_started = time.perf_counter()
            noop = run_index(scan(), registry, embedder, config)  # hashing included: scan() reads the texts
            result["noop_seconds"] = round(time.perf_counter() - noop_started, 4)
            result["noop_stage_seconds"] = noop.stage_seconds
            result["final_chunks"] = noop.chunks["active"]
    artifacts.cleanup()
    checks = result["checks"]
    result["stale"] = max((c["stale"] for c in checks), default=0)
    result["missing"] = max((c["missing"] for c in checks), default=0)
    result["active_chunks_of_deleted_documents"] = max(
        (c["active_chunks_of_deleted_documents"] for c in checks), default=0
    )
    result["total_seconds"] = round(time.perf_counter() - started, 2)
    result["check_seconds"] = round(check_seconds, 2)  # comparing with fresh builds, part of the total
    return result

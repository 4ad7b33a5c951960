"""Indexing configuration: one frozen dataclass read from RAGPIPE_* variables and CLI flags at run time."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from pipeline.chunking import CONTEXT_MODES, DEFAULT_CONTEXT
from pipeline.embedding import DEFAULT_MODEL
from pipeline.errors import ConfigError
from pipeline.formats.isolation import DEFAULT_MAX_UNZIPPED_BYTES, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S
from pipeline.sources import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, DEFAULT_MAX_BYTES

_INDEX_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # fullmatch: "$" alone also matches before a final newline


def _csv(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


@dataclass(frozen=True)
class IndexConfig:
    """How one index is built. Every field has a ``RAGPIPE_<NAME>`` variable and a CLI flag.

    Attributes:
        index: index name (lowercase letters, digits, '-' and '_').
        model: sentence-transformers model name (``org/name``, pinned to its cached snapshot's
            commit; ``org/name@REV``) or path, or ``openai:NAME`` for an OpenAI-compatible endpoint.
        query_prefix, passage_prefix: what the model sees before each query and each passage; None
            takes the model's default (e5, bge, the model's own ``prompts``), ``"none"`` means none.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...
        chunk_context: what each chunk is embedded and BM25-indexed with besides its text:
            'section' (its document's title and its innermost heading), 'headings' (the title and
            the whole heading path), 'title' or 'none'.
        batch_size: texts per embedding call; each batch is cached as soon as it is embedded.
        include: glob patterns of files to index (directory and object-store sources).
        exclude: glob patterns of files and directories to leave out.
        max_document_bytes: larger documents are skipped with a reason.
        extract_timeout: seconds one PDF, DOCX or HTML file's extraction may take.
        extract_memory_mb: the extraction worker's address-space limit in MiB.
        max_unzipped_bytes: the most a DOCX's zip members may expand to (larger: refused as a zip bomb).
        lock_timeout: seconds to wait for another run on the same index.
        allow_delete_all: let a run whose source is empty delete every document.
        alias: the alias runs publish to (default: the index name).
        artifacts: where versions' files live: a directory or a pyarrow.fs URL (default HOME/artifacts).
        hnsw_m, hnsw_ef_construction: HNSW graph parameters.
        hnsw_ef_search: HNSW search breadth used by validation.
        min_recall: least HNSW recall@10 against exact search a version must reach.
        golden_set: JSONL of {"query", "expected_doc_ids"} checked before publishing.
        golden_k, golden_min_recall, golden_max_drop: the golden set's recall@k floor and the most it
            may fall below the live version's.
        retention: how many of the newest versions gc keeps (live, shadow and head ones always stay).
        embed_task_size: chunk texts per embedding task of an orchestrated run (one mapped Airflow
            task each).
        run_lease: seconds an orchestrated run keeps the index reserved between two of its steps;
            each step renews it. A run whose lease ran out may be taken over.
        embedding_cache_ttl: seconds an embedding cache entry that no retained version uses (of
            any index, with the entry's model) is kept before ``ragpipe gc`` deletes it.
        segment_rows: the most chunks a segment a full build writes holds (later segments are the
            runs' additions; compaction merges them).
        exact_segment_rows: a segment of fewer chunks gets no HNSW graph and is searched exactly
            (runs' small additions and upserts publish without building one; 0: every segment
            gets a graph).
    """

    index: str = "docs"
    model: str = DEFAULT_MODEL
    query_prefix: str | None = None
    passage_prefix: str | None = None
    device: str = "auto"
    chunk_context: str = DEFAULT_CONTEXT
    batch_size: int = 64
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    max_document_bytes: int = DEFAULT_MAX_BYTES
    extract_timeout: float = DEFAULT_TIMEOUT_S
    extract_memory_mb: int = DEFAULT_MEMORY_MB
    max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES
    lock_timeout: float = 600.0
    allow_delete_all: bool = False
    alias: str = ""
    artifacts: str | None = None
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 100
    min_recall: float = 0.95
    golden_set: str | None = None
    golden_k: int = 10
    golden_min_recall: float = 0.0
    golden_max_drop: float = 0.05
    retention: int = 5
    embed_task_size: int = 2048
    run_lease: float = 3600.0
    embedding_cache_ttl: float = 30 * 86400.0
    segment_rows: int = 250_000
    exact_segment_rows: int = 16_384

    def __post_init__(self) -> None:
        if not _INDEX_NAME.fullmatch(self.index):
            raise ConfigError(f"index name {self.index!r} must match {_INDEX_NAME.pattern}")
        if not self.alias:
            object.__setattr__(self, "alias", self.index)
        if not _INDEX_NAME.fullmatch(self.alias):
            raise ConfigError(f"alias {self.alias!r} must match {_INDEX_NAME.pattern}")
        if self.chunk_context not in CONTEXT_MODES:
            raise ConfigError(f"chunk_context {self.chunk_context!r} is not one of {', '.join(CONTEXT_MODES)}")
        if self.retention < 1:
            raise ConfigError(f"retention must be at least 1, got {self.retention}")
        if self.embed_task_size < 1:
            raise ConfigError(f"embed_task_size must be positive, got {self.embed_task_size}")
        if self.run_lease <= 0:
            raise ConfigError(f"run_lease must be positive, got {self.run_lease}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_document_bytes < 1:
            raise ConfigError(f"max_document_bytes must be positive, got {self.max_document_bytes}")
        if self.extract_timeout <= 0 or self.extract_memory_mb < 64 or self.max_unzipped_bytes < 1:
            raise ConfigError("extract_timeout must be positive, extract_memory_mb at least 64, "
                              "max_unzipped_bytes positive")
        if self.lock_timeout < 0:
            raise ConfigError(f"lock_timeout must not be negative, got {self.lock_timeout}")
        if self.segment_rows < 1:
            raise ConfigError(f"segment_rows must be positive, got {self.segment_rows}")
        if self.exact_segment_rows < 0:
            raise ConfigError(f"exact_segment_rows must be 0 or more, got {self.exact_segment_rows}")
        if self.embedding_cache_ttl < 0:
            raise ConfigError(f"embedding_cache_ttl must not be negative, got {self.embedding_cache_ttl}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "IndexConfig":
        """Read ``RAGPIPE_*`` variables; overrides that are not None (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"RAGPIPE_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                if f.type in ("str | None",):
                    values[f.name] = raw
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                elif f.type in ("float", float):
                    values[f.name] = float(raw)
                elif f.type in ("bool", bool):
                    values[f.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
                elif "tuple" in str(f.type):
                    values[f.name] = _csv(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ConfigError(f"RAGPIPE_{f.name.upper()}={raw!r} is not a valid {f.type}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "index" in values and "alias" not in values:
            values["alias"] = values["index"]
        return replace(cls(), **values)

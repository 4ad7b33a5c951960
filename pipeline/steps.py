"""An indexing run as separate steps, for orchestrators that run each step in its own process.

The Airflow DAGs call one function of this module per task; any other orchestrator can do the
same. Each function opens the registry from the configuration, does one step of
``pipeline.runner`` and returns a small JSON-ready dict (run id, counts, URIs): the run's plan
travels in the registry (``runs.state``), document texts and embedding work lists in the run's
workspace next to the artifacts, never through the orchestrator.

Guarantees, step by step:

- **One run at a time per index.** ``plan`` starts the run under the index lock and gives it a
  lease; every later step takes the lock for its own duration and renews the lease. A run of
  another owner (the CLI, another DAG) does not start while the lease is live; a new run of the
  same owner takes over that owner's unfinished run, whose steps then fail with ``RunNotRunning``.
- **Retry-safe.** Every step can run again after a failure or a kill: ``stage`` abandons what an
  earlier attempt staged, ``embed`` only embeds cache misses, ``build`` rewrites the files,
  ``validate`` and ``publish`` see that they already happened.
- **Transient errors keep the run**: the step fails and the orchestrator retries it. Terminal
  errors (bad configuration, a rejected version) end the run as failed; nothing was published.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa

from pipeline.build_stage import SegmentPart, build_part, plan_parts
from pipeline.config import IndexConfig
from pipeline.embedding import Embedder
from pipeline.errors import ConfigError
from pipeline.formats import Layout
from pipeline.runner import (
    RunContext,
    RunOptions,
    RunState,
    artifact_store,
    build_run,
    embed_items,
    gc_run,
    missing_texts,
    needed_rows,
    plan_run,
    publish_run,
    recording,
    recover_unfinished,
    stage_run,
    start_run,
    validate_run,
)
from pipeline.hashing import content_hash
from pipeline.sources import ObjectStoreCredentials, source_label
from registry import Registry, RegistryConfig
from registry.config import dsn_from_parts
from registry.errors import is_transient
from retrieval.segments.manifest import SegmentRef

EmbedderFactory = Callable[[IndexConfig], Embedder]


def default_embedder(config: IndexConfig) -> Embedder:
    from pipeline.embedding import embedder_for

    return embedder_for(config)


def registry_config(
    *, host: str | None = None, port: int | None = None, user: str | None = None, password: str | None = None,
    dbname: str | None = None,
) -> RegistryConfig:
    """The registry configuration: RAGPIPE_* variables, with the database given by separate
    connection fields (an Airflow Connection) when a host is given."""
    if not host:
        return RegistryConfig.from_env()
    return RegistryConfig.from_env(
        database_url=dsn_from_parts(host=host, port=port, user=user, password=password, dbname=dbname)
    )


@contextmanager
def _registry(registry_config: RegistryConfig | None) -> Iterator[Registry]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Registry.open(registry_config or RegistryConfig.from_env()) as registry:
        yield registry


def plan(
    source: str,
    config: IndexConfig,
    *,
    owner: str,
    options: RunOptions = RunOptions(),
    registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
    source_credentials: ObjectStoreCredentials | None = None,
) -> dict[str, Any]:
    """Start a run: recover what killed runs left, discover ``source``, diff it against the registry.

    ``source_credentials`` reach an S3 source (default: the standard AWS variables); they are used
    here only, and neither saved with the run nor returned.

    When something changed, the texts of the documents to chunk go to the run's workspace. When
    nothing did, the run ends here (succeeded, no version).

    Returns:
        {"run_id", "changed", "documents": counts, "skipped": count, "documents_uri"}.
    """
    model = embedder(config)
    with _registry(registry_config) as registry, registry.index_lock(config.index, config.lock_timeout):
        store = artifact_store(config, registry.home)
        state = start_run(registry, config, source_label(source), model.model_id, options, owner=owner,
                          lease_s=config.run_lease)
        with _step(registry, state, final=False):
            store.remove_run_files(config.index)  # workspaces of earlier runs, all finished or taken over
            scan = plan_run(RunContext(registry, model, config, store), state, source, source_credentials)
            uri = None
            if state.changed:
                wanted = set(state.to_chunk)
                docs = [d for d in scan.documents if d.doc_id in wanted]
                table = pa.table({"doc_id": [d.doc_id for d in docs], "text": [d.text for d in docs],
                                  "layout": [json.dumps(d.layout.to_json()) if d.layout else None for d in docs]})
                uri = store.write_run_table(config.index, state.summary.run_id, "documents.parquet", table)
            else:
                state.summary.status = "succeeded"
        return {"run_id": state.summary.run_id, "changed": state.changed, "documents": state.summary.documents,
                "skipped": len(state.summary.skipped), "documents_uri": uri}


def stage(
    run_id: int, config: IndexConfig, *, registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
) -> dict[str, Any]:
    """Chunk the run's new and changed documents, stage the version's rows, and split the chunk
    texts the embedding cache lacks into work lists of ``config.embed_task_size``.

    Returns:
        {"run_id", "version", "chunks": staged count, "to_embed": count, "batches": [work list URIs]}.
    """
    model = embedder(config)
    with _continue(run_id, config, registry_config) as (registry, state):
        store = artifact_store(config, registry.home)
        if state.step == "planned":
            recover_unfinished(registry, store, config.index)  # what an earlier attempt of this step staged
            uri = store.run_file_uri(config.index, run_id, "documents.parquet")
            table = store.read_run_table(uri).to_pylist()
            planned = {d.doc_id: d for d in state.documents()}
            docs = []
            for row in table:
                doc = replace(planned[row["doc_id"]], text=row["text"],
                              layout=Layout.from_json(json.loads(row.get("layout") or "null")))
                if content_hash(doc.text) != doc.content_hash:
                    raise ConfigError(
                        f"document {doc.doc_id!r}: the run's workspace text does not match its planned hash")
                docs.append(doc)
            stage_run(RunContext(registry, model, config, store), state, docs)
            _rows, needed = needed_rows(registry, config.index, state)
            items, distinct = missing_texts(registry, model.model_id, needed)
            size = config.embed_task_size
            state.to_embed = len(items)
            state.cached_before = distinct - len(items)
            state.summary.embedding = {"chunks_embedded": 0, "chunks_cached": state.cached_before, "chars_embedded": 0}
            state.batches = []
            for i in range(0, len(items), size):
                work = items[i:i + size]
                table = pa.table({"chunk_hash": [h for h, _ in work], "text": [t for _, t in work]})
                state.batches.append(store.write_run_table(config.index, run_id, f"embed-{i // size:05d}.parquet", table))
        return {"run_id": run_id, "version": state.summary.version, "chunks": state.staged_chunks,
                "to_embed": state.to_embed, "batches": state.batches}


def embed(
    run_id: int, batch_uri: str, config: IndexConfig, *, registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
) -> dict[str, Any]:
    """Embed one work list's texts the cache still lacks (a retried or repeated task embeds nothing
    twice). Runs without the index lock: the cache is content-addressed, so tasks of one run can
    embed in parallel on many workers."""
    model = embedder(config)
    with _registry(registry_config) as registry:
        registry.renew_lease(run_id, config.run_lease)
        rows = artifact_store(config, registry.home).read_run_table(batch_uri).to_pylist()
        wanted = {r["chunk_hash"]: r["text"] for r in rows}
        missing = registry.missing_embeddings(model.model_id, list(wanted))
        chars = embed_items(registry, model, [(h, wanted[h]) for h in missing], config.batch_size)
        return {"run_id": run_id, "chunks_embedded": len(missing), "chunks_cached": len(wanted) - len(missing),
                "chars_embedded": chars}


def segment_parts(run_id: int, config: IndexConfig, *, registry_config: RegistryConfig | None = None
                  ) -> list[dict[str, Any]]:
    """The parts a full build fans out into, one per segment (see :func:`build_segment`); empty for
    an incremental build or one that fits one segment, which :func:`build` writes whole."""
    with _continue(run_id, config, registry_config) as (registry, state):
        if state.step not in ("staged", "embedded"):
            return []
        return [part.to_json() for part in plan_parts(RunContext.of(registry, None, config), state)]


def build_segment(
    part: dict[str, Any], config: IndexConfig, *, registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
) -> dict[str, Any]:
    """Write one segment of a fanned-out full build and upload it to the artifact store.

    The parts of a build run at once, on any workers: this step renews the run's lease but takes no
    index lock and changes nothing in the registry; a retried part writes a new segment (the one an
    earlier attempt left is collected by gc).

    Returns:
        {"run_id", "number", "segments": [segment references]}.
    """
    segment = SegmentPart.from_json(part)
    model = embedder(config)
    with _registry(registry_config) as registry:
        index, saved = registry.renew_lease(segment.run_id, config.run_lease)
        if index != config.index or saved is None:
            raise ConfigError(f"run {segment.run_id} is not a run of index {config.index!r} started by pipeline.steps")
        state = RunState.from_json(saved)
        refs = build_part(RunContext.of(registry, model, config), state, segment)
    return {"run_id": segment.run_id, "number": segment.number, "segments": [asdict(r) for r in refs]}


def build(
    run_id: int, config: IndexConfig, *, embedded: list[dict[str, Any]] | None = None,
    segments: list[dict[str, Any]] | None = None, registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
) -> dict[str, Any]:
    """Build the staged version's files; ``embedded`` are the embed steps' results (for the counts),
    ``segments`` the :func:`build_segment` steps' (their segments make the version; none: this step
    writes them).

    Returns:
        {"run_id", "version", "artifact_uri", "full_build"}.
    """
    model = embedder(config)
    parts = [SegmentRef(**ref) for result in sorted(segments or [], key=lambda r: int(r["number"]))
             for ref in result["segments"]]
    with _continue(run_id, config, registry_config) as (registry, state):
        if state.step in ("staged", "embedded"):
            if embedded is not None:  # texts cached before the run, plus what its embedding tasks did
                state.summary.embedding = {
                    "chunks_embedded": sum(int(e["chunks_embedded"]) for e in embedded),
                    "chunks_cached": state.cached_before + sum(int(e["chunks_cached"]) for e in embedded),
                    "chars_embedded": sum(int(e["chars_embedded"]) for e in embedded),
                }
            build_run(RunContext.of(registry, model, config), state, parts)
        version = registry.get_version(state.summary.version) if state.summary.version else None
        return {"run_id": run_id, "version": state.summary.version,
                "artifact_uri": version.artifact_uri if version else None, "full_build": state.summary.full_build}


def validate(
    run_id: int, config: IndexConfig, *, registry_config: RegistryConfig | None = None,
    embedder: EmbedderFactory = default_embedder,
) -> dict[str, Any]:
    """Run the validation gate; a failing version is rejected and the run ends failed (terminal)."""
    model = embedder(config)
    with _continue(run_id, config, registry_config) as (registry, state):
        if state.step == "built":
            validate_run(RunContext.of(registry, model, config), state)
        return {"run_id": run_id, "version": state.summary.version, "metrics": state.summary.metrics}


def publish(run_id: int, config: IndexConfig, *, registry_config: RegistryConfig | None = None) -> dict[str, Any]:
    """Make the validated version live behind the alias (or its shadow).

    Returns:
        {"run_id", "index", "version", "alias", "previous", "action", "artifact_uri"}.
    """
    with _continue(run_id, config, registry_config) as (registry, state):
        head = registry.head_version(config.index)
        committed = (head is not None and head.version == state.summary.version) or (
            state.options.shadow and any(a.shadow_version == state.summary.version for a in registry.list_aliases()))
        if state.step == "validated" and committed:
            state.step = "published"  # an earlier attempt committed, then died before saying so
        elif state.step == "validated":
            publish_run(RunContext.of(registry, None, config), state)
        version = registry.get_version(state.summary.version) if state.summary.version else None
        alias = state.summary.alias or {}
        return {"run_id": run_id, "index": config.index, "version": state.summary.version,
                "alias": alias.get("alias", config.alias), "previous": alias.get("previous"),
                "action": alias.get("action", "shadow" if state.options.shadow else "publish"),
                "artifact_uri": version.artifact_uri if version else None}


def gc(run_id: int, config: IndexConfig, *, registry_config: RegistryConfig | None = None) -> dict[str, Any]:
    """Remove versions beyond the retention and the run's workspace; the run ends succeeded.

    Run again after it succeeded (its task died before the orchestrator heard), it reports that."""
    with _registry(registry_config) as registry:
        run = registry.get_run(run_id)
        if run is not None and run.status == "succeeded":
            return {"run_id": run_id, "already_finished": True}
    with _continue(run_id, config, registry_config, final=True) as (registry, state):
        if state.step == "published":
            gc_run(RunContext.of(registry, None, config), state)
            artifact_store(config, registry.home).remove_run_files(config.index, run_id)
        return {"run_id": run_id, **state.summary.gc}


@contextmanager
def _continue(
    run_id: int, config: IndexConfig, registry_config: RegistryConfig | None, *, final: bool = False,
) -> Iterator[tuple[Registry, RunState]]:
    """Open the registry, take the index lock, renew the run's lease and load its state; save the
    state when the step is done."""
    with _registry(registry_config) as registry, registry.index_lock(config.index, config.lock_timeout):
        index, saved = registry.renew_lease(run_id, config.run_lease)
        if index != config.index:
            raise ConfigError(f"run {run_id} belongs to index {index!r}, not {config.index!r}")
        if saved is None:
            raise ConfigError(f"run {run_id} has no saved state: it was not started by pipeline.steps.plan")
        state = RunState.from_json(saved)
        with _step(registry, state, final=final):
            yield registry, state


@contextmanager
def _step(registry: Registry, state: RunState, *, final: bool) -> Iterator[None]:
    """Record the step's outcome: state saved on success; on a terminal error the run ends failed,
    on a transient one it stays running for the retry."""
    try:
        with recording(registry, state, final=final, keep_running=is_transient):
            yield
    finally:
        if registry.connected:
            registry.save_run_state(state.summary.run_id, state.to_json())


__all__ = ["build", "build_segment", "default_embedder", "embed", "gc", "is_transient", "plan", "publish",
           "registry_config", "segment_parts", "stage", "validate"]


def compact(config: IndexConfig, *, registry_config: RegistryConfig | None = None) -> dict[str, Any]:
    """Merge the head version's segments when the merge policy asks (after a publish); a merge that
    lost the race to a newer publish is discarded (the next run's compact step merges again).

    Returns:
        {"index", "status", "version", "segments_before", "segments_after"}.
    """
    from pipeline.compaction import compact_index

    with _registry(registry_config) as registry:
        report = compact_index(registry, config)
    return {"index": report.index, "status": report.status, "version": report.version,
            "segments_before": report.segments_before, "segments_after": report.segments_after}

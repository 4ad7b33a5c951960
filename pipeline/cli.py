"""The ``ragpipe`` command: each command's handler calls the pipeline, registry or retrieval library.

The grammar is ``pipeline.cli_parser``'s, the text printed for people ``pipeline.cli_output``'s;
``--json`` prints the result itself.

Exit codes: 0 success, 1 a terminal error (fix something, then rerun), 2 usage, 75 a transient
error (another run holds the index, the database is unreachable: retry later).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pipeline.cli_output import (
    format_alias_move,
    format_evaluation,
    format_gc,
    format_hits,
    format_replay,
    format_run,
    format_served,
    format_summary,
    format_table,
    format_versions_gc,
)
from pipeline.cli_parser import build_parser

if TYPE_CHECKING:
    from registry import VersionListing

EXIT_TERMINAL = 1
EXIT_TRANSIENT = 75


def _cmd_dags_folder(args: argparse.Namespace) -> int:
    from pipeline import dags_folder

    print(dags_folder())
    return 0


def _registry_config(args: argparse.Namespace) -> Any:
    from registry import RegistryConfig

    return RegistryConfig.from_env(database_url=args.database_url, home=args.home)


def _index_config(args: argparse.Namespace) -> Any:
    from pipeline.config import IndexConfig

    return IndexConfig.from_env(
        index=getattr(args, "index", None),
        model=getattr(args, "model", None),
        device=getattr(args, "device", None),
        batch_size=getattr(args, "batch_size", None),
        query_prefix=getattr(args, "query_prefix", None),
        passage_prefix=getattr(args, "passage_prefix", None),
        chunk_context=getattr(args, "chunk_context", None),
        artifacts=getattr(args, "artifacts", None),
        golden_set=getattr(args, "golden_set", None),
        retention=getattr(args, "retention", None),
        include=tuple(args.include) if getattr(args, "include", None) else None,
        exclude=tuple(args.exclude) if getattr(args, "exclude", None) else None,
        max_document_bytes=getattr(args, "max_document_bytes", None),
        extract_timeout=getattr(args, "extract_timeout", None),
        extract_memory_mb=getattr(args, "extract_memory_mb", None),
        max_unzipped_bytes=getattr(args, "max_unzipped_bytes", None),
        lock_timeout=getattr(args, "lock_timeout", None),
        allow_delete_all=getattr(args, "allow_delete_all", None),
        embedding_cache_ttl=getattr(args, "embedding_cache_ttl", None),
    )


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from registry import db

    config = _registry_config(args)
    url = db.resolve_database_url(config.database_url, config.home)
    with db.connect(url, autocommit=True) as conn:
        applied = db.upgrade(conn)
        version = db.current_version(conn)
    print(f"schema at version {version}" + (f" (applied {', '.join(map(str, applied))})" if applied else " (current)"))
    return 0


def _model_embedder(config: Any) -> Any:
    from pipeline.embedding import embedder_for

    return embedder_for(config)


def _cmd_index(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.runner import RunOptions, run_index
    from registry import Registry

    config = _index_config(args)
    if args.shadow and not (args.full and args.model):
        raise ConfigError("--shadow builds a version with another model: use it with --full and --model")
    embedder = _model_embedder(config)
    with Registry.open(_registry_config(args)) as registry:
        summary = run_index(args.source, registry, embedder, config, progress=not args.json,
                            options=RunOptions(full=args.full, shadow=args.shadow))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_upsert(args: argparse.Namespace) -> int:
    from pipeline.upsert import delete_documents, upsert_documents
    from registry import Registry

    config = _index_config(args)
    embedder = _model_embedder(config)
    with Registry.open(_registry_config(args)) as registry:
        if args.command == "upsert":
            outcome = upsert_documents(args.batch, registry, embedder, config, progress=not args.json)
        else:
            outcome = delete_documents(args.doc_ids, registry, embedder, config)
    print(json.dumps(outcome.to_dict(), indent=2) if args.json else format_summary(outcome.summary))
    for item in outcome.rejected:
        print(f"ragpipe: rejected {item['doc_id']}: {item['reason']}", file=sys.stderr)
    return EXIT_TERMINAL if outcome.rejected else 0


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    print(json.dumps(rows, indent=2, default=str) if as_json else format_table(rows, columns))


def _cmd_alias(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.runner import artifact_store
    from registry import Registry

    with Registry.open(_registry_config(args)) as registry:
        if args.alias_command == "list":
            _print_rows([asdict(a) for a in registry.list_aliases()],
                        ["alias", "index_name", "version", "shadow_version", "canary_version", "canary_percent",
                         "model_id", "chunks", "updated_at"], args.json)
            return 0
        if args.alias_command == "abort":
            move = registry.abort_canary(args.alias, args.reason)
            assert move is not None  # without a version, abort_canary raises when there is no canary
            return _print_move(move, args.json)
        canary = registry.canary_of(args.alias) if args.alias_command == "promote" else None
        if args.alias_command in ("swap", "canary"):
            target = args.version
        elif args.alias_command == "rollback":
            target = registry.rollback_candidate(args.alias)
        else:
            target = canary.canary_version if canary is not None else registry.shadow_of(args.alias)
        row = registry.get_version(target)
        if row is not None:  # the registry names a missing version itself
            store = artifact_store(_index_config(args), registry.home)
            if not store.exists(row.index_name, target):
                raise ConfigError(f"version {target}'s files are missing from {store.version_uri(row.index_name, target)}; "
                                  f"alias {args.alias!r} unchanged")
        if args.alias_command == "canary":
            move = registry.start_canary(args.alias, target, args.percent, _guards(args.guard), args.guard_min_queries)
        elif canary is not None:
            move = registry.promote_canary(args.alias)
        else:
            move = registry.swap_alias(args.alias, target, action=args.alias_command)
    return _print_move(move, args.json)


def _guards(texts: list[str]) -> list[Any]:
    from pipeline.errors import ConfigError
    from registry import Guard

    try:
        return [Guard.parse(text) for text in texts]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _print_move(move: Any, as_json: bool) -> int:
    result = {"alias": move.alias, "version": move.version, "previous": move.previous, "action": move.action}
    print(json.dumps(result) if as_json else format_alias_move(move))
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        rows = registry.list_runs(config.index, args.limit)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2, default=str))
        return 0
    for r in rows:
        print(format_run(r))
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from pipeline.runner import artifact_store, collect_garbage
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        if args.versions_command == "list":
            stats: dict[str, dict[str, Any]] = {}
            for s in registry.version_stats(config.index):
                stats.setdefault(s.version, {})[s.role] = s.to_dict()
            feedback: dict[str, dict[str, Any]] = {}
            for q in registry.quality_report(config.index):
                feedback.setdefault(q.version, {})[f"{q.kind}/{q.source}"] = {"count": q.count, "mean": q.mean}
            rows = [{**_version_record(v, stats.get(v.version, {})), "feedback": feedback.get(v.version, {})}
                    for v in registry.list_versions(config.index)]
            _print_rows(rows, ["version", "status", "role", "chunks", "model_id", "full_build", "created_at",
                               "served", "feedback", "metrics", "reason"], args.json)
            return 0
        with registry.index_lock(config.index, config.lock_timeout):
            result = collect_garbage(registry, artifact_store(config, registry.home), config.index, config.retention)
    print(json.dumps(result) if args.json else format_versions_gc(result))
    return 0


def _version_record(v: VersionListing, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A row of ``versions list``: the version's columns, its role flags as one ``role``, and what
    serving processes measured of it per role (``stats``: live, canary, shadow)."""
    record = {k: value for k, value in asdict(v).items() if k not in ("live", "shadow", "head", "canary")}
    return {**record, "role": v.role, "stats": stats, "served": format_served(stats)}


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.gc import collect_all
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        report = collect_all(registry, config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_gc(report))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.runner import artifact_store
    from pipeline.verify import verify_index
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        report = verify_index(registry, artifact_store(config, registry.home), config.index, config.alias)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else EXIT_TERMINAL


def _cmd_compact(args: argparse.Namespace) -> int:
    from pipeline.compaction import compact_index
    from registry import Registry

    with Registry.open(_registry_config(args)) as registry:
        report = compact_index(registry, _index_config(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"index {report.index}: {report.status}" + (f" {report.version}" if report.version else "")
              + f", {report.segments_before} -> {report.segments_after} segments"
              + (f" ({report.reason})" if report.reason else ""))
    return EXIT_TRANSIENT if report.status == "discarded" else 0


def _retrieval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"reranker": getattr(args, "reranker", None),
                              "fusion": getattr(args, "fusion", None)}.items() if v is not None}


def _cmd_search(args: argparse.Namespace) -> int:
    from retrieval import Retriever

    config = _index_config(args)
    registry_config = _registry_config(args)
    with Retriever.open(config.index, registry_config.database_url, home=registry_config.home, follow=False,
                        **_retrieval_overrides(args)) as retriever:
        hits = retriever.search(args.query, k=args.k, route_key=args.route_key)
    print(json.dumps([h.to_dict() for h in hits], indent=2) if args.json else
          format_hits(hits, retriever.alias, f"{hits.version} (canary)" if hits.route == "canary" else hits.version))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation import MODES, evaluate

    config = _index_config(args)
    result = evaluate(args.dataset_dir, _registry_config(args), _model_embedder(config),
                      args.mode or list(MODES), args.limit_queries, _retrieval_overrides(args),
                      chunk_context=config.chunk_context)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.replay import run_replay

    config = _index_config(args)
    if args.embedder == "deterministic":
        from pipeline.deterministic import DeterministicEmbedder

        embedder: Any = DeterministicEmbedder(tokenizer_model=config.model)
    else:
        embedder = _model_embedder(config)

    def report(step: int, check: dict[str, Any]) -> None:
        if not args.json:
            print(f"step {step}: stale {check['stale']}  missing {check['missing']}", file=sys.stderr)

    result = run_replay(
        args.replay_dir,
        _registry_config(args),
        embedder,
        check_every=args.check_every,
        max_steps=args.steps,
        keep_database=args.keep_database,
        on_step=report,
        chunk_context=config.chunk_context,
    )
    print(json.dumps(result, indent=2) if args.json else format_replay(result))
    return 0 if result["stale"] == 0 and result["missing"] == 0 else EXIT_TERMINAL


def _cmd_serve(args: argparse.Namespace) -> int:
    from registry.extras import require

    require("fastapi", "serve", "ragpipe serve")
    from service import ServeConfig, serve

    config = ServeConfig.from_env(indexes=tuple(args.index or ()), host=args.host, port=args.port,
                                  workers=args.workers, tokens_file=args.tokens_file,
                                  cors_origins=tuple(args.cors_origin or ()), database_url=args.database_url,
                                  home=args.home)
    serve(config)
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    from registry import Registry

    with Registry.open(_registry_config(args)) as registry:
        rows = [asdict(r) for r in registry.quality_report(args.index)]
    _print_rows(rows, ["index_name", "version", "status", "kind", "source", "count", "mean", "last_at"], args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handlers = {"db": _cmd_db_upgrade, "index": _cmd_index, "upsert": _cmd_upsert, "delete": _cmd_upsert, "replay": _cmd_replay, "alias": _cmd_alias,
                "versions": _cmd_versions, "runs": _cmd_runs, "verify": _cmd_verify, "compact": _cmd_compact, "search": _cmd_search,
                "eval": _cmd_eval, "gc": _cmd_gc, "serve": _cmd_serve, "quality": _cmd_quality,
                "dags-folder": _cmd_dags_folder}
    from pipeline.errors import PipelineError
    from registry.db import connection_error
    from registry.errors import RegistryError
    from retrieval.errors import RetrievalError

    try:
        return handlers[args.command](args)
    except (PipelineError, RegistryError, RetrievalError) as exc:
        print(f"ragpipe: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if exc.transient else EXIT_TERMINAL
    except Exception as exc:
        lost = connection_error(exc)  # the server dropped a connection in use (restart, failover)
        if lost is None:
            raise
        print(f"ragpipe: {lost}", file=sys.stderr)
        return EXIT_TRANSIENT


if __name__ == "__main__":
    sys.exit(main())

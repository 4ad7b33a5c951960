"""The ``ragpipe`` command: database, indexing and replay entry points over the pipeline.

Exit codes: 0 success, 1 a terminal error (fix something, then rerun), 2 usage, 75 a transient
error (another run holds the index, the database is unreachable: retry later).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_TERMINAL = 1
EXIT_TRANSIENT = 75


def _add_registry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="PostgreSQL URL (env RAGPIPE_DATABASE_URL; default: embedded server)")
    parser.add_argument("--home", help="ragpipe home directory (env RAGPIPE_HOME; default ./.ragpipe)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name, path or openai:NAME (env RAGPIPE_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... (env RAGPIPE_DEVICE)")
    parser.add_argument("--batch-size", type=int, help="texts per embedding batch (env RAGPIPE_BATCH_SIZE)")
    parser.add_argument("--query-prefix", help="text before every query ('none': none; env RAGPIPE_QUERY_PREFIX)")
    parser.add_argument("--passage-prefix", help="text before every passage ('none': none; env RAGPIPE_PASSAGE_PREFIX)")


def _cmd_dags_folder(args: argparse.Namespace) -> int:
    from pipeline import dags_folder

    print(dags_folder())
    return 0


def package_version() -> str:
    from pipeline import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragpipe", description="Incremental, versioned RAG indexing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"ragpipe {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dags-folder", help="print the folder of ragpipe's Airflow DAG files (for AIRFLOW__CORE__DAGS_FOLDER)")

    db = sub.add_parser("db", help="registry database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations")
    _add_registry_flags(upgrade)

    index = sub.add_parser("index", help="run one incremental indexing pass over SOURCE")
    index.add_argument("source", help="a directory tree or a .jsonl file (doc_id, text, metadata)")
    index.add_argument("--index", help="index name (env RAGPIPE_INDEX; default docs)")
    index.add_argument("--include", action="append", help="glob of files to index (repeatable)")
    index.add_argument("--exclude", action="append", help="glob of files to leave out (repeatable)")
    index.add_argument("--max-document-bytes", type=int, help="skip larger documents (default 10 MiB)")
    index.add_argument("--lock-timeout", type=float, help="seconds to wait for another run (default 600)")
    index.add_argument("--allow-delete-all", action="store_true", default=None,
                       help="let an empty source delete every document of the index")
    index.add_argument("--full", action="store_true", help="rebuild the version from the registry alone")
    index.add_argument("--shadow", action="store_true",
                       help="with --full and --model: attach the version to the alias as its shadow")
    index.add_argument("--artifacts", help="where versions' files live (env RAGPIPE_ARTIFACTS)")
    index.add_argument("--golden-set", help="JSONL golden queries checked before publishing")
    index.add_argument("--json", action="store_true", help="print the run summary as JSON")
    _add_model_flags(index)
    _add_registry_flags(index)

    alias = sub.add_parser("alias", help="aliases: list, swap, rollback, promote")
    alias_sub = alias.add_subparsers(dest="alias_command", required=True)
    for name, help_text in [("list", "aliases and the versions they serve"),
                            ("swap", "point ALIAS at VERSION (any retained, validated version)"),
                            ("rollback", "point ALIAS at the previous retained version"),
                            ("promote", "make ALIAS's shadow version its live one")]:
        cmd = alias_sub.add_parser(name, help=help_text)
        if name != "list":
            cmd.add_argument("alias")
        if name == "swap":
            cmd.add_argument("version")
        cmd.add_argument("--artifacts", help="where versions' files live (env RAGPIPE_ARTIFACTS)")
        cmd.add_argument("--json", action="store_true")
        _add_registry_flags(cmd)

    versions = sub.add_parser("versions", help="index versions: list, gc")
    versions_sub = versions.add_subparsers(dest="versions_command", required=True)
    for name, help_text in [("list", "versions with status and metrics"),
                            ("gc", "remove versions beyond the retention count")]:
        cmd = versions_sub.add_parser(name, help=help_text)
        cmd.add_argument("--index", help="index name (env RAGPIPE_INDEX; default docs)")
        cmd.add_argument("--retention", type=int, help="versions to keep (env RAGPIPE_RETENTION; default 5)")
        cmd.add_argument("--artifacts", help="where versions' files live (env RAGPIPE_ARTIFACTS)")
        cmd.add_argument("--json", action="store_true")
        _add_registry_flags(cmd)

    runs = sub.add_parser("runs", help="indexing runs: list")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_list = runs_sub.add_parser("list", help="the newest runs with what each did")
    runs_list.add_argument("--index", help="index name (env RAGPIPE_INDEX; default docs)")
    runs_list.add_argument("--limit", type=int, default=10, help="how many runs, newest first")
    runs_list.add_argument("--json", action="store_true")
    _add_registry_flags(runs_list)

    search = sub.add_parser("search", help="search the live version of an index")
    search.add_argument("query")
    search.add_argument("--index", help="index (alias) name (env RAGPIPE_INDEX; default docs)")
    search.add_argument("--k", type=int, default=5, help="how many hits")
    search.add_argument("--reranker", help="exact (default), none, exact:W, or a cross-encoder name/path")
    search.add_argument("--fusion", choices=["rrf", "weighted"], help="how to combine BM25 and vector lists")
    search.add_argument("--json", action="store_true")
    _add_registry_flags(search)

    evaluate = sub.add_parser("eval", help="measure retrieval on a BEIR-layout data set (throwaway index)")
    evaluate.add_argument("dataset_dir", type=Path)
    evaluate.add_argument("--mode", action="append", choices=["bm25", "dense", "hybrid", "hybrid+rerank"],
                          help="repeatable; default all four")
    evaluate.add_argument("--limit-queries", type=int, help="evaluate only the first N queries")
    evaluate.add_argument("--reranker", help="reranker of the hybrid+rerank mode")
    evaluate.add_argument("--json", action="store_true")
    _add_model_flags(evaluate)
    _add_registry_flags(evaluate)

    verify = sub.add_parser("verify", help="check the invariants against registry and artifacts")
    verify.add_argument("--index", help="index name (env RAGPIPE_INDEX; default docs)")
    verify.add_argument("--artifacts", help="where versions' files live (env RAGPIPE_ARTIFACTS)")
    verify.add_argument("--json", action="store_true")
    _add_registry_flags(verify)

    from benchmarks import BENCHMARKS

    bench = sub.add_parser("bench", help="run a benchmark; prints its JSON result (see docs/benchmarks.md)")
    bench.add_argument("name", choices=list(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help)")

    replay = sub.add_parser("replay", help="replay a recorded edit history and check every step")
    replay.add_argument("replay_dir", type=Path, help="directory with base.jsonl and changes.jsonl")
    replay.add_argument("--embedder", choices=["model", "deterministic"], default="model",
                        help="'deterministic': hash-derived vectors for counting runs (not a retriever)")
    replay.add_argument("--check-every", type=int, default=10, help="compare with a fresh build every N steps")
    replay.add_argument("--steps", type=int, help="replay only the first N steps")
    replay.add_argument("--keep-database", action="store_true", help="keep the scratch database for inspection")
    replay.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_flags(replay)
    _add_registry_flags(replay)
    return parser


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
        artifacts=getattr(args, "artifacts", None),
        golden_set=getattr(args, "golden_set", None),
        retention=getattr(args, "retention", None),
        include=tuple(args.include) if getattr(args, "include", None) else None,
        exclude=tuple(args.exclude) if getattr(args, "exclude", None) else None,
        max_document_bytes=getattr(args, "max_document_bytes", None),
        lock_timeout=getattr(args, "lock_timeout", None),
        allow_delete_all=getattr(args, "allow_delete_all", None),
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
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary.to_dict()))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """A readable run summary for people."""
    d, c, e = s["documents"], s["chunks"], s["embedding"]
    lines = [
        f"run {s['run_id']} on index {s['index']!r}: {s['status']}"
        + (f", version {s['version']}" if s["version"] else ", nothing changed"),
        f"  documents  seen {d['seen']}  new {d['new']}  changed {d['changed']}  unchanged {d['unchanged']}"
        f"  metadata-only {d['metadata_only']}  deleted {d['deleted']}  skipped {d['skipped']}",
        f"  chunks     added {c['added']}  removed {c['removed']}  kept {c['kept']}  active {c['active']}",
        f"  embedding  {e['chunks_embedded']} embedded ({e['chars_embedded']} chars), {e['chunks_cached']} from cache"
        f"  [{s['model_id']}]",
        "  seconds    " + "  ".join(f"{k} {v:.3f}" for k, v in s["stage_seconds"].items()),
    ]
    if s.get("alias"):
        a = s["alias"]
        role = "shadow of" if a["action"] == "shadow" else "live on"
        lines.append(f"  alias      {a['version']} is {role} {a['alias']!r}"
                     + (f" (was {a['previous']})" if a["previous"] else "")
                     + ("  [full build]" if s.get("full_build") else ""))
    if s.get("metrics"):
        lines.append("  validated  " + "  ".join(f"{k} {v}" for k, v in s["metrics"].items()))
    if s.get("recovered"):
        lines.append(f"  recovered  unfinished versions {', '.join(s['recovered'])}")
    if s["skipped"]:
        lines.append(f"  skipped ({len(s['skipped'])}):")
        lines.extend(f"    {item['doc_id']}: {item['reason']}" for item in s["skipped"][:50])
        if len(s["skipped"]) > 50:
            lines.append(f"    ... and {len(s['skipped']) - 50} more (--json lists all)")
    return "\n".join(lines)


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _cmd_alias(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.runner import artifact_store
    from registry import Registry

    with Registry.open(_registry_config(args)) as registry:
        if args.alias_command == "list":
            _print_rows(registry.list_aliases(),
                        ["alias", "index_name", "version", "shadow_version", "model_id", "chunks", "updated_at"],
                        args.json)
            return 0
        if args.alias_command == "swap":
            target = args.version
        elif args.alias_command == "rollback":
            target = registry.rollback_candidate(args.alias)
        else:
            target = registry.shadow_of(args.alias)
        row = registry.get_version(target)
        if row is not None:  # the registry names a missing version itself
            store = artifact_store(_index_config(args), registry.home)
            if not store.exists(row["index_name"], target):
                raise ConfigError(f"version {target}'s files are missing from {store.version_uri(row['index_name'], target)}; "
                                  f"alias {args.alias!r} unchanged")
        move = registry.swap_alias(args.alias, target, action=args.alias_command)
    result = {"alias": move.alias, "version": move.version, "previous": move.previous, "action": move.action}
    print(json.dumps(result) if args.json else f"alias {move.alias}: {move.previous} -> {move.version} ({move.action})")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        rows = registry.list_runs(config.index, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(format_run(r))
    return 0


def format_run(r: dict[str, Any]) -> str:
    """One run as a person reads it: outcome, version, what changed, what was embedded, seconds."""
    counts = r.get("counts") or {}
    d, c, e = counts.get("documents") or {}, counts.get("chunks") or {}, counts.get("embedding") or {}
    took = (r["finished_at"] - r["started_at"]).total_seconds() if r.get("finished_at") else None
    head = (f"run {r['run_id']} ({r['owner']}) on index {r['index_name']!r}: {r['status']}"
            + (f", version {counts['version']}" if counts.get("version") else
               ", nothing changed" if r["status"] == "succeeded" else "")
            + (f", {took:.1f} s" if took is not None else ""))
    lines = [head]
    if d:
        lines.append(f"  documents  seen {d.get('seen', 0)}  new {d.get('new', 0)}  changed {d.get('changed', 0)}  "
                     f"unchanged {d.get('unchanged', 0)}  deleted {d.get('deleted', 0)}  skipped {d.get('skipped', 0)}")
    if c:
        lines.append(f"  chunks     added {c.get('added', 0)}  removed {c.get('removed', 0)}"
                     f"  active {c.get('active', 0)}")
    if e:
        lines.append(f"  embedding  {e.get('chunks_embedded', 0)} embedded, {e.get('chunks_cached', 0)} from cache")
    if r.get("error"):
        lines.append(f"  error      {r['error']}")
    return "\n".join(lines)


def _cmd_versions(args: argparse.Namespace) -> int:
    from pipeline.runner import artifact_store, collect_garbage
    from registry import Registry

    config = _index_config(args)
    with Registry.open(_registry_config(args)) as registry:
        if args.versions_command == "list":
            rows = registry.list_versions(config.index)
            for r in rows:
                r["role"] = ",".join(k for k in ("live", "shadow", "head") if r.pop(k)) or None
            _print_rows(rows, ["version", "status", "role", "chunks", "model_id", "full_build", "created_at",
                               "metrics", "reason"], args.json)
            return 0
        with registry.index_lock(config.index, config.lock_timeout):
            result = collect_garbage(registry, artifact_store(config, registry.home), config.index, config.retention)
    print(json.dumps(result) if args.json else
          f"removed {len(result['versions_removed'])} versions and {result['rows_removed']} registry rows")
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


def _retrieval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"reranker": getattr(args, "reranker", None),
                              "fusion": getattr(args, "fusion", None)}.items() if v is not None}


def _cmd_search(args: argparse.Namespace) -> int:
    from retrieval import Retriever

    config = _index_config(args)
    registry_config = _registry_config(args)
    with Retriever.open(config.index, registry_config.database_url, home=registry_config.home, follow=False,
                        **_retrieval_overrides(args)) as retriever:
        hits = retriever.search(args.query, k=args.k)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return 0
    print(f"{len(hits)} hits from {retriever.alias!r} version {retriever.version}")
    for rank, h in enumerate(hits, start=1):
        where = " > ".join(h.heading_path) or "(no heading)"
        print(f"{rank:>2}. {h.score:.4f}  {h.doc_id}  [{where}]  chars {h.char_start}-{h.char_end}")
        stages = "  ".join(f"{name} {s.score:.4f} (#{s.rank})" if s.score is not None else f"{name} -"
                           for name, s in (("bm25", h.bm25), ("vector", h.vector), ("fused", h.fused),
                                           ("rerank", h.rerank)))
        print(f"    {stages}")
        snippet = " ".join(h.text.split())
        print(f"    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")
        print(f"    {h.source_uri}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation import MODES, evaluate

    config = _index_config(args)
    result = evaluate(args.dataset_dir, _registry_config(args), _model_embedder(config),
                      args.mode or list(MODES), args.limit_queries, _retrieval_overrides(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['dataset']}: {result['documents']} documents, {result['chunks']} chunks, "
          f"{result['queries']} queries, model {result['model_id']}")
    _print_rows([{"mode": m, **v} for m, v in result["modes"].items()],
                ["mode", "ndcg@10", "recall@100", "mrr@10", "latency_p50_ms", "latency_p95_ms"], False)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.replay import run_replay

    config = _index_config(args)
    if args.embedder == "deterministic":
        from benchmarks.embedders import DeterministicEmbedder

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
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if key not in {"checks", "noop_stage_seconds"}:
                print(f"{key:36} {value}")
    return 0 if result["stale"] == 0 and result["missing"] == 0 else EXIT_TERMINAL


def _cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks import run_benchmark

    return run_benchmark(args.name, args.args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handlers = {"db": _cmd_db_upgrade, "index": _cmd_index, "replay": _cmd_replay, "alias": _cmd_alias,
                "versions": _cmd_versions, "runs": _cmd_runs, "verify": _cmd_verify, "search": _cmd_search,
                "eval": _cmd_eval, "bench": _cmd_bench, "dags-folder": _cmd_dags_folder}
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

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
    parser.add_argument("--model", help="sentence-transformers model name or path (env RAGPIPE_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... (env RAGPIPE_DEVICE)")
    parser.add_argument("--batch-size", type=int, help="texts per embedding batch (env RAGPIPE_BATCH_SIZE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragpipe", description="Incremental, versioned RAG indexing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

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
    index.add_argument("--json", action="store_true", help="print the run summary as JSON")
    _add_model_flags(index)
    _add_registry_flags(index)

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
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
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
    from pipeline.embedding import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(config.model, device=config.device, batch_size=config.batch_size)


def _cmd_index(args: argparse.Namespace) -> int:
    from pipeline.runner import run_index
    from registry import Registry

    config = _index_config(args)
    embedder = _model_embedder(config)
    with Registry.open(_registry_config(args)) as registry:
        summary = run_index(args.source, registry, embedder, config, progress=not args.json)
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
    if s["skipped"]:
        lines.append(f"  skipped ({len(s['skipped'])}):")
        lines.extend(f"    {item['doc_id']}: {item['reason']}" for item in s["skipped"][:50])
        if len(s["skipped"]) > 50:
            lines.append(f"    ... and {len(s['skipped']) - 50} more (--json lists all)")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handlers = {"db": _cmd_db_upgrade, "index": _cmd_index, "replay": _cmd_replay}
    from pipeline.errors import PipelineError
    from registry.errors import RegistryError

    try:
        return handlers[args.command](args)
    except (PipelineError, RegistryError) as exc:
        print(f"ragpipe: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if exc.transient else EXIT_TERMINAL


if __name__ == "__main__":
    sys.exit(main())

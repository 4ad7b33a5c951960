"""The ``ragpipe`` command line's grammar: one parser per command group, the flags they share.

``pipeline.cli`` parses with :func:`build_parser` and dispatches on ``command``; nothing here reads
the environment or opens anything, so the grammar can be checked alone (tests/test_compose.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

INDEX_HELP = "index name (env RAGPIPE_INDEX; default docs)"
ARTIFACTS_HELP = "where versions' files live (env RAGPIPE_ARTIFACTS)"
RETENTION_HELP = "versions to keep (env RAGPIPE_RETENTION; default 5)"


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ragpipe`` parser; the chosen command is ``args.command``."""
    parser = argparse.ArgumentParser(prog="ragpipe", description="Incremental, versioned RAG indexing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"ragpipe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_group in COMMAND_GROUPS:
        add_group(commands)
    return parser


def add_registry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="PostgreSQL URL (env RAGPIPE_DATABASE_URL; default: embedded server)")
    parser.add_argument("--home", help="ragpipe home directory (env RAGPIPE_HOME; default ./.ragpipe)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--json`` and where the registry is: the last flags of most commands."""
    parser.add_argument("--json", action="store_true")
    add_registry_flags(parser)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name, path or openai:NAME (env RAGPIPE_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... (env RAGPIPE_DEVICE)")
    parser.add_argument("--batch-size", type=int, help="texts per embedding batch (env RAGPIPE_BATCH_SIZE)")
    parser.add_argument("--query-prefix", help="text before every query ('none': none; env RAGPIPE_QUERY_PREFIX)")
    parser.add_argument("--passage-prefix", help="text before every passage ('none': none; env RAGPIPE_PASSAGE_PREFIX)")
    parser.add_argument("--chunk-context", choices=["headings", "section", "title", "none"],
                        help="what chunks are indexed with besides their text (env RAGPIPE_CHUNK_CONTEXT; "
                             "default section: title > innermost heading; headings: title > section > subsection)")


def add_db(commands: Commands) -> None:
    db = commands.add_parser("db", help="registry database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations")
    add_registry_flags(upgrade)


def add_index(commands: Commands) -> None:
    index = commands.add_parser("index", help="run one incremental indexing pass over SOURCE")
    index.add_argument("source", help="a directory tree, a .jsonl file (doc_id, text, metadata), or an object-store URI (s3://bucket/prefix/, gs://, file://; credentials from AWS_* variables)")
    index.add_argument("--index", help=INDEX_HELP)
    index.add_argument("--include", action="append", help="glob of files to index (repeatable)")
    index.add_argument("--exclude", action="append", help="glob of files to leave out (repeatable)")
    index.add_argument("--max-document-bytes", type=int, help="skip larger documents (default 10 MiB)")
    index.add_argument("--extract-timeout", type=float, help="seconds per PDF, DOCX or HTML extraction (default 60)")
    index.add_argument("--extract-memory-mb", type=int, help="memory limit of the extraction worker (default 1024)")
    index.add_argument("--max-unzipped-bytes", type=int, help="refuse DOCX files expanding beyond this (default 100 MiB)")
    index.add_argument("--lock-timeout", type=float, help="seconds to wait for another run (default 600)")
    index.add_argument("--allow-delete-all", action="store_true", default=None,
                       help="let an empty source delete every document of the index")
    index.add_argument("--full", action="store_true", help="rebuild the version from the registry alone")
    index.add_argument("--shadow", action="store_true",
                       help="with --full and --model: attach the version to the alias as its shadow")
    index.add_argument("--artifacts", help=ARTIFACTS_HELP)
    index.add_argument("--golden-set", help="JSONL golden queries checked before publishing")
    index.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_model_flags(index)
    add_registry_flags(index)


def add_upsert(commands: Commands) -> None:
    upsert = commands.add_parser("upsert", help="add or replace the documents of a JSONL batch, publish at once")
    upsert.add_argument("batch", help="a .jsonl file of {doc_id, text, metadata} lines, or - for standard input")
    upsert.add_argument("--index", help=INDEX_HELP)
    upsert.add_argument("--max-document-bytes", type=int, help="reject larger documents (default 10 MiB)")
    upsert.add_argument("--lock-timeout", type=float, help="seconds to wait for a run holding the index (default 600)")
    upsert.add_argument("--artifacts", help=ARTIFACTS_HELP)
    upsert.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_model_flags(upsert)
    add_registry_flags(upsert)
    delete = commands.add_parser("delete", help="delete documents by doc_id, publish at once")
    delete.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    delete.add_argument("--index", help=INDEX_HELP)
    delete.add_argument("--lock-timeout", type=float, help="seconds to wait for a run holding the index (default 600)")
    delete.add_argument("--artifacts", help=ARTIFACTS_HELP)
    delete.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_model_flags(delete)
    add_registry_flags(delete)


def add_alias(commands: Commands) -> None:
    alias = commands.add_parser("alias", help="aliases: list, swap, rollback, canary, promote, abort")
    alias_sub = alias.add_subparsers(dest="alias_command", required=True)
    for name, help_text in [("list", "aliases and the versions they serve"),
                            ("swap", "point ALIAS at VERSION (any retained, validated version)"),
                            ("rollback", "point ALIAS at the previous retained version"),
                            ("canary", "route PERCENT %% of ALIAS's requests to VERSION (by route key)"),
                            ("promote", "make ALIAS's canary (else its shadow) its live version"),
                            ("abort", "end ALIAS's canary: every request goes to the live version")]:
        cmd = alias_sub.add_parser(name, help=help_text)
        if name != "list":
            cmd.add_argument("alias")
        if name in ("swap", "canary"):
            cmd.add_argument("version")
        if name == "canary":
            cmd.add_argument("--percent", type=float, required=True, help="share of requests, 0-100")
            cmd.add_argument("--guard", action="append", default=[],
                             help="abort by itself when METRIC<X or METRIC>X holds, METRIC one of overlap@10, "
                                  "p50_ms, p95_ms (repeatable; e.g. 'overlap@10<0.6', 'p95_ms>50')")
            cmd.add_argument("--guard-min-queries", type=int, default=100,
                             help="queries measured before guards are judged (default 100)")
        if name == "abort":
            cmd.add_argument("--reason", default="aborted by the operator", help="recorded in the alias history")
        cmd.add_argument("--artifacts", help=ARTIFACTS_HELP)
        add_output_flags(cmd)


def add_versions(commands: Commands) -> None:
    versions = commands.add_parser("versions", help="index versions: list, gc")
    versions_sub = versions.add_subparsers(dest="versions_command", required=True)
    for name, help_text in [("list", "versions with status and metrics"),
                            ("gc", "remove versions beyond the retention count")]:
        cmd = versions_sub.add_parser(name, help=help_text)
        cmd.add_argument("--index", help=INDEX_HELP)
        cmd.add_argument("--retention", type=int, help=RETENTION_HELP)
        cmd.add_argument("--artifacts", help=ARTIFACTS_HELP)
        add_output_flags(cmd)


def add_runs(commands: Commands) -> None:
    runs = commands.add_parser("runs", help="indexing runs: list")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_list = runs_sub.add_parser("list", help="the newest runs with what each did")
    runs_list.add_argument("--index", help=INDEX_HELP)
    runs_list.add_argument("--limit", type=int, default=10, help="how many runs, newest first")
    add_output_flags(runs_list)


def add_search(commands: Commands) -> None:
    search = commands.add_parser("search", help="search the live version of an index")
    search.add_argument("query")
    search.add_argument("--index", help="index (alias) name (env RAGPIPE_INDEX; default docs)")
    search.add_argument("--k", type=int, default=5, help="how many hits")
    search.add_argument("--reranker", help="exact (default), none, exact:W, or a cross-encoder name/path")
    search.add_argument("--fusion", choices=["rrf", "weighted"], help="how to combine BM25 and vector lists")
    search.add_argument("--route-key", help="routes the query while the alias has a canary (a client or session id)")
    add_output_flags(search)


def add_eval(commands: Commands) -> None:
    evaluate = commands.add_parser("eval", help="measure retrieval on a BEIR-layout data set (throwaway index)")
    evaluate.add_argument("dataset_dir", type=Path)
    evaluate.add_argument("--mode", action="append", choices=["bm25", "dense", "hybrid", "hybrid+rerank"],
                          help="repeatable; default all four")
    evaluate.add_argument("--limit-queries", type=int, help="evaluate only the first N queries")
    evaluate.add_argument("--reranker", help="reranker of the hybrid+rerank mode")
    evaluate.add_argument("--json", action="store_true")
    add_model_flags(evaluate)
    add_registry_flags(evaluate)


def add_verify(commands: Commands) -> None:
    verify = commands.add_parser("verify", help="check the invariants against registry and artifacts")
    verify.add_argument("--index", help=INDEX_HELP)
    verify.add_argument("--artifacts", help=ARTIFACTS_HELP)
    add_output_flags(verify)


def add_compact(commands: Commands) -> None:
    compact = commands.add_parser("compact", help="merge the live version's segments as the merge policy asks")
    compact.add_argument("--index", help=INDEX_HELP)
    compact.add_argument("--artifacts", help=ARTIFACTS_HELP)
    compact.add_argument("--lock-timeout", type=float, help="seconds to wait for a run at the swap (default 600)")
    add_output_flags(compact)


def add_replay(commands: Commands) -> None:
    replay = commands.add_parser("replay", help="replay a recorded edit history and check every step")
    replay.add_argument("replay_dir", type=Path, help="directory with base.jsonl and changes.jsonl")
    replay.add_argument("--embedder", choices=["model", "deterministic"], default="model",
                        help="'deterministic': hash-derived vectors for counting runs (not a retriever)")
    replay.add_argument("--check-every", type=int, default=10, help="compare with a fresh build every N steps")
    replay.add_argument("--steps", type=int, help="replay only the first N steps")
    replay.add_argument("--keep-database", action="store_true", help="keep the scratch database for inspection")
    replay.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_flags(replay)
    add_registry_flags(replay)


def add_dags_folder(commands: Commands) -> None:
    commands.add_parser("dags-folder", help="print the folder of ragpipe's Airflow DAG files (AIRFLOW__CORE__DAGS_FOLDER)")


def add_gc(commands: Commands) -> None:
    gc = commands.add_parser("gc", help="remove old versions, unused embedding-cache entries and stale downloads")
    gc.add_argument("--index", help=INDEX_HELP)
    gc.add_argument("--retention", type=int, help=RETENTION_HELP)
    gc.add_argument("--embedding-cache-ttl", type=float,
                    help="seconds an embedding-cache entry no retained version uses is kept "
                         "(env RAGPIPE_EMBEDDING_CACHE_TTL; default 2592000, 30 days)")
    gc.add_argument("--artifacts", help=ARTIFACTS_HELP)
    add_output_flags(gc)


def add_serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="serve search over HTTP (needs ragpipe[serve])")
    serve.add_argument("--index", action="append",
                       help="alias to serve (repeatable; env RAGPIPE_SERVE_INDEXES; default: every alias)")
    serve.add_argument("--host", help="address to listen on (env RAGPIPE_SERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env RAGPIPE_SERVE_PORT; default 8000)")
    serve.add_argument("--workers", type=int, help="server processes (env RAGPIPE_SERVE_WORKERS; default 1)")
    serve.add_argument("--tokens-file", help="bearer tokens, one a line (also env RAGPIPE_SERVE_TOKENS)")
    serve.add_argument("--cors-origin", action="append", help="origin allowed cross-origin (repeatable; default none)")
    add_registry_flags(serve)


def add_quality(commands: Commands) -> None:
    quality = commands.add_parser("quality", help="feedback on served results, per version")
    quality_sub = quality.add_subparsers(dest="quality_command", required=True)
    report = quality_sub.add_parser("report", help="count and mean score per version, kind and source")
    report.add_argument("--index", help="only this index (default: every index)")
    add_output_flags(report)


# the order of ``ragpipe --help``
COMMAND_GROUPS: list[Callable[[Commands], None]] = [
    add_db, add_index, add_upsert, add_alias, add_versions, add_runs, add_search, add_eval, add_verify, add_compact, add_replay, add_gc,
    add_serve, add_quality, add_dags_folder,
]

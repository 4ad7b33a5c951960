"""The registry on a real PostgreSQL: migrations, the apply transaction, the cache and the lock."""

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from conftest import write_tree
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from registry import AliasError, FeedbackEntry, IndexLocked, Registry, RegistryConfig, StatsDelta
from registry import db as registry_db
from registry.queries import fetch_all, fetch_one, parse_queries, q
from registry.rows import QUERY_ROWS, RunListing

pytestmark = pytest.mark.db


def test_migrations_apply_once_and_record(empty_database_url):
    with registry_db.connect(empty_database_url, autocommit=True) as conn:
        assert registry_db.current_version(conn) == 0
        first = registry_db.upgrade(conn)
        assert first == [m.version for m in registry_db.list_migrations()]
        assert registry_db.upgrade(conn) == []
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == first


def test_migrations_are_safe_concurrently(empty_database_url):
    errors = []

    def migrate():
        try:
            with registry_db.connect(empty_database_url, autocommit=True) as conn:
                registry_db.upgrade(conn)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with registry_db.connect(empty_database_url, autocommit=True) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
    assert count == len(registry_db.list_migrations())


def test_open_migrates_on_first_use(empty_database_url, tmp_path):
    with Registry.open(RegistryConfig(database_url=empty_database_url, home=tmp_path)) as reg:
        assert registry_db.current_version(reg.conn) == registry_db.list_migrations()[-1].version


def test_query_file_parses():
    queries = parse_queries("-- name: a\nSELECT 1;\n\n-- name: b\n-- why\nSELECT 2;\n")
    assert queries == {"a": "SELECT 1", "b": "-- why\nSELECT 2"}
    with pytest.raises(ValueError):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


def test_each_typed_query_selects_exactly_its_row_fields(tmp_path, registry, embedder):
    # class_row fails on a column the dataclass lacks, and the CLI's JSON is asdict in field order:
    # so each query's columns must be its row type's fields, in order, for every query in QUERY_ROWS
    write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha text.\n", "b.md": "# B\n\nBeta text.\n"})
    src_uri = (tmp_path / "src").as_uri() + "/"  # a file:// source: its listing is recorded
    summary = run_index(src_uri, registry, embedder, IndexConfig(index="docs", lock_timeout=5))
    write_tree(tmp_path / "src", {"c.md": "# C\n\nGamma text.\n"})
    second = run_index(src_uri, registry, embedder, IndexConfig(index="docs", lock_timeout=5))
    registry.start_canary("docs", summary.version, 10.0)  # the first version, beside the second
    canary = registry.canary_of("docs")
    delta = StatsDelta("docs", summary.version, "canary")
    delta.record(3.0, 0.5)
    registry.record_version_stats([delta])
    head = registry.head_version("docs")
    registry.create_version(index="docs", version="docs_unfinished", parent=head.version, run_id=summary.run_id,
                            model_id=embedder.model_id, full_build=False)
    params: dict[str, dict[str, Any]] = {
        "list_runs": {"index": "docs", "limit": 10},
        "get_run": {"run_id": summary.run_id},
        "member_rows": {"index": "docs", "seq": head.version_seq, "all_docs": True, "doc_ids": []},
        "member_rows_page": {"index": "docs", "seq": head.version_seq, "after": 0, "until": None, "limit": 10},
        "active_chunks": {"index": "docs"},
        "document_fields": {"index": "docs"},
        "head_version": {"index": "docs"},
        "unfinished_versions": {"index": "docs"},
        "list_versions": {"index": "docs"},
        "get_version": {"version": summary.version},
        "list_aliases": {},
        "get_canary": {"alias": "docs"},
        "version_stats_of_index": {"index": "docs"},
        "canary_stats": {"alias": "docs", "version": summary.version, "since": canary.canary_started_at},
        "source_objects": {"index": "docs", "source": src_uri},
        "quality_report": {"index": "docs"},
    }
    registry.record_feedback(FeedbackEntry(request_id="r1", index_name="docs", alias="docs", version=summary.version,
                                           chunk_id=None, kind="thumbs", source="user", score=1.0, query="alpha"))
    assert sorted(QUERY_ROWS) == sorted(params)  # a query given a row type is checked here too
    for name, row_type in QUERY_ROWS.items():
        with registry.conn.cursor() as cur:
            cur.execute(q(name), params[name])
            columns = [c.name for c in cur.description]
            assert cur.fetchall(), f"query {name} returned no rows to check"
        fields = [f.name for f in dataclasses.fields(row_type)]
        assert columns == fields, f"query {name} selects {columns}; {row_type.__name__} has {fields}"
        assert all(isinstance(r, row_type) for r in fetch_all(registry.conn, name, row_type, params[name]))
    with pytest.raises(TypeError, match="query 'get_run' returns .*RunRow.*, not RunListing"):
        fetch_one(registry.conn, "get_run", RunListing, params["get_run"])
    assert registry.get_run(summary.run_id).status == "succeeded"
    assert [v.role for v in registry.list_versions("docs")] == [None, "live,head", "canary"]
    assert second.version == registry.list_aliases()[0].version
    assert [u.version for u in registry.unfinished_versions("docs")] == ["docs_unfinished"]


def test_embedding_cache_round_trip_keeps_first_vector(registry):
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    registry.store_embeddings("m", ["h1", "h2", "h3"], vectors)
    assert registry.missing_embeddings("m", ["h1", "h4", "h1", "h2"]) == ["h4"]
    assert registry.missing_embeddings("other-model", ["h1"]) == ["h1"]
    registry.store_embeddings("m", ["h1"], np.zeros((1, 8), dtype=np.float32))  # never overwrites
    got = registry.fetch_embeddings("m", ["h1", "h2", "h9"])
    assert set(got) == {"h1", "h2"}
    np.testing.assert_array_equal(got["h1"], vectors[0])


@dataclass
class Doc:
    doc_id: str
    source_uri: str = "uri"
    content_hash: str = "c"
    metadata: dict = None  # type: ignore[assignment]
    metadata_hash: str = "m"

    def __post_init__(self):
        self.metadata = self.metadata or {}


@dataclass
class Row:
    doc_id: str
    chunk_id: str
    chunk_hash: str = "h"
    ordinal: int = 0
    heading_path: tuple = ("A", "B")
    char_start: int = 0
    char_end: int = 5
    token_count: int = 2
    text: str = "hello"
    context: str = ""
    pages: object = None  # a PDF chunk's PageRange; these rows have none


def build(reg, run_id, docs=(), chunks=(), rechunked=(), deleted=(), fail_inside=False):
    """Stage and publish one version the way a run does, without files."""
    version = f"t_{run_id}"
    head = reg.head_version("t")
    seq = reg.create_version(index="t", version=version, parent=head.version if head else None, run_id=run_id,
                             model_id="m", full_build=False)
    staged = reg.stage_version(index="t", version=version, seq=seq, run_id=run_id, chunks=list(chunks),
                               valid_from={}, rechunked_doc_ids=list(rechunked), deleted_doc_ids=list(deleted))
    reg.mark_version_validated(version, {})

    def explode():
        raise RuntimeError("killed inside the publish transaction")

    reg.publish(index="t", alias="t", version=version, seq=seq, run_id=run_id, documents=list(docs),
                chunk_counts={d.doc_id: sum(1 for c in chunks if c.doc_id == d.doc_id) for d in docs},
                chunker_versions={d.doc_id: "v" for d in docs}, valid_from={}, deleted_doc_ids=list(deleted),
                before_commit=explode if fail_inside else None)
    return seq, staged


def test_versions_supersede_keep_and_delete_exactly(registry):
    r1 = registry.start_run("t", "src")
    seq1, staged = build(registry, r1, [Doc("a"), Doc("b")], [Row("a", "a0"), Row("a", "a1"), Row("b", "b0")],
                         ["a", "b"])
    assert staged == (3, 0)
    assert registry.active_chunk_ids("t") == {"a0", "a1", "b0"}

    r2 = registry.start_run("t", "src")
    seq2, staged = build(registry, r2, [Doc("a", content_hash="c2")], [Row("a", "a0"), Row("a", "a2")], ["a"],
                         deleted=["b"])
    assert staged == (1, 2)
    assert registry.active_chunk_ids("t") == {"a0", "a2"}
    statuses = dict(registry.conn.execute("SELECT chunk_id, status FROM chunks WHERE index_name='t'").fetchall())
    assert statuses == {"a0": "active", "a1": "superseded", "a2": "active", "b0": "deleted"}
    states = registry.document_states("t")
    assert states["a"].content_hash == "c2" and states["a"].chunk_count == 2
    assert states["b"].status == "deleted"
    # each version's chunk set stays queryable: the registry side of "one version, one chunk set"
    keys = dict(registry.conn.execute("SELECT chunk_id, chunk_key FROM chunks").fetchall())
    assert registry.member_keys("t", seq1) == {keys["a0"], keys["a1"], keys["b0"]}
    assert registry.member_keys("t", seq2) == {keys["a0"], keys["a2"]}
    assert registry.head_version("t").version == "t_%d" % r2
    aliases = registry.list_aliases()
    assert [(a.alias, a.version) for a in aliases] == [("t", "t_%d" % r2)]
    assert registry.get_version("t_%d" % r1).status == "retired"


def test_publish_is_one_transaction(registry):
    r1 = registry.start_run("t", "src")
    build(registry, r1, [Doc("a")], [Row("a", "a0")], ["a"])
    r2 = registry.start_run("t", "src")
    with pytest.raises(RuntimeError, match="killed inside"):
        build(registry, r2, [Doc("a", content_hash="c2")], [Row("a", "a5")], ["a"], fail_inside=True)
    assert registry.active_chunk_ids("t") == {"a0"}
    assert registry.document_states("t")["a"].content_hash == "c"
    assert registry.list_aliases()[0].version == "t_%d" % r1
    # the half-published version is left staged; a run abandons it before doing anything else
    [unfinished] = registry.unfinished_versions("t")
    registry.abandon_version("t", unfinished.version, unfinished.version_seq, "abandoned")
    assert registry.get_version(unfinished.version).status == "rejected"
    assert registry.conn.execute("SELECT status FROM chunks WHERE chunk_id = 'a5'").fetchone() == ("discarded",)
    assert registry.conn.execute("SELECT retired_seq FROM chunks WHERE chunk_id = 'a0'").fetchone() == (None,)


def test_swap_rollback_and_their_errors(registry):
    runs = [registry.start_run("t", "src") for _ in range(3)]
    build(registry, runs[0], [Doc("a")], [Row("a", "a0")], ["a"])
    build(registry, runs[1], [Doc("a", content_hash="c2")], [Row("a", "a1")], ["a"])
    build(registry, runs[2], [Doc("a", content_hash="c3")], [Row("a", "a2")], ["a"])
    v = ["t_%d" % r for r in runs]
    assert registry.rollback_alias("t").version == v[1]
    assert registry.rollback_alias("t").version == v[0]
    with pytest.raises(AliasError, match="no older retained version"):
        registry.rollback_alias("t")
    move = registry.swap_alias("t", v[2])
    assert (move.version, move.previous, move.action) == (v[2], v[0], "swap")
    with pytest.raises(AliasError, match="does not exist"):
        registry.swap_alias("t", "nope")
    with pytest.raises(AliasError, match="alias 'x' does not exist"):
        registry.swap_alias("x", v[0])
    history = registry.conn.execute("SELECT action FROM alias_history ORDER BY id").fetchall()
    assert [h[0] for h in history] == ["publish", "publish", "publish", "rollback", "rollback", "swap"]


def test_index_lock_is_exclusive(registry_config):
    with Registry.open(registry_config, migrate=False) as one, Registry.open(registry_config, migrate=False) as two:
        with one.index_lock("t", timeout_s=1):
            with pytest.raises(IndexLocked, match="nothing changed"):
                with two.index_lock("t", timeout_s=0.2):
                    pass
            with two.index_lock("other", timeout_s=0.2):
                pass
        with two.index_lock("t", timeout_s=0.2):
            pass


def describe_schema(url):
    """Tables, columns, constraints and indexes of the public schema, comparable across databases."""
    with registry_db.connect(url, autocommit=True) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity"
            " FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'schema_migrations'"
            " ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'schema_migrations'"
            " ORDER BY 1, 2"
        ).fetchall()
        indexes = conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations' ORDER BY 1, 2"
        ).fetchall()
    return columns, constraints, indexes


def test_migrations_equal_schema_sql(database_url, empty_database_url):
    with registry_db.connect(empty_database_url, autocommit=True) as conn:
        conn.execute((registry_db.SQL_DIR / "schema.sql").read_text())
        conn.execute("SET search_path TO public")
    migrated, declared = describe_schema(database_url), describe_schema(empty_database_url)
    assert migrated[0] and migrated == declared, "sql/schema.sql is out of date: run `make schema`"


def test_publish_and_swap_notify_listeners(registry, registry_config):
    import json as _json

    from registry.db import connect

    with connect(registry.url, autocommit=True) as listener:
        listener.execute("LISTEN ragpipe_alias")
        r1 = registry.start_run("t", "src")
        build(registry, r1, [Doc("a")], [Row("a", "a0")], ["a"])
        r2 = registry.start_run("t", "src")
        build(registry, r2, [Doc("a", content_hash="c2")], [Row("a", "a1")], ["a"])
        registry.rollback_alias("t")
        got = [_json.loads(n.payload) for n in listener.notifies(timeout=1.0, stop_after=3)]
    assert [(n["action"], n["version"]) for n in got] == [
        ("publish", f"t_{r1}"), ("publish", f"t_{r2}"), ("rollback", f"t_{r1}")]

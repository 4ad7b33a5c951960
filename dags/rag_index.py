"""ragpipe's Airflow DAGs: ``rag_index`` (scheduled, incremental) and ``rag_index_rebuild`` (full).

Both wire the steps of ``pipeline.steps``; every task body is one call into it:

    discover_and_diff ─► changed? ─► chunk ─► embed (mapped over work lists) ─► segment_parts
        ─► build_segment (mapped: a full build's segments) ─► build ─► validate ─► publish ─► gc ─► compact

A full build of more than ``RAGPIPE_SEGMENT_ROWS`` chunks writes each segment in a task of its own,
so K workers write K segments at once; ``build`` then writes the version manifest over them. An
incremental build writes its one segment in ``build``.

Parsing this file imports only the Airflow SDK: configuration (``RAGPIPE_*`` variables, the
``ragpipe_registry`` Airflow Connection, the ``ragpipe_source`` Airflow Variable) is read inside
tasks. The one exception is the schedule, which Airflow needs at parse time:
``RAGPIPE_SCHEDULE`` (default hourly) and ``RAGPIPE_REBUILD_SCHEDULE`` (default weekly), read from
the environment only.

XCom carries run ids, counts and URIs. A run where nothing changed stops after
``discover_and_diff``. Terminal errors (bad configuration, a rejected version) fail the task without
retry; transient ones (database, I/O, a busy index) retry with exponential backoff. Publishing
emits an event on the asset alias ``ragpipe_index_published`` for the asset ``ragpipe://INDEX``,
with the version in its extra, so downstream DAGs can react.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

PUBLISHED = AssetAlias("ragpipe_index_published")
REGISTRY_CONNECTION = "ragpipe_registry"
SOURCE_VARIABLE = "ragpipe_source"

DEFAULT_ARGS = {
    "owner": "ragpipe",
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}


# the pool the embedding tasks take slots of (parse time): size it to the workers' embedding capacity
EMBED_POOL = os.environ.get("RAGPIPE_EMBED_POOL") or "default_pool"


def _schedule(variable: str, default: str) -> str | None:
    """A DAG's schedule from the environment (parse time); ``none`` for none (triggered runs only)."""
    value = os.environ.get(variable) or default
    return None if value.strip().lower() == "none" else value


def published_asset(index: str) -> Asset:
    """The asset a publish of ``index`` updates (attached to the ``PUBLISHED`` alias at run time)."""
    return Asset(name=f"ragpipe_index_{index}", uri=f"ragpipe://{index}")


# -- configuration, read inside tasks -----------------------------------------------------------


def _params() -> dict[str, Any]:
    return dict(get_current_context()["params"])


def _config() -> Any:
    from pipeline.config import IndexConfig

    params = _params()
    return IndexConfig.from_env(index=params.get("index") or None, model=params.get("model") or None)


def _registry_config() -> Any:
    """The registry DSN from the ``ragpipe_registry`` Connection when defined, else RAGPIPE_DATABASE_URL
    (else the embedded server)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from pipeline.steps import registry_config

    try:
        conn = Connection.get(REGISTRY_CONNECTION)
    except AirflowNotFoundException:  # not defined: the environment decides
        return registry_config()
    return registry_config(host=conn.host, port=conn.port, user=conn.login, password=conn.password, dbname=conn.schema)


def _source() -> str:
    source = _params().get("source")
    if not source:
        from airflow.sdk import Variable

        source = Variable.get(SOURCE_VARIABLE, default=None) or os.environ.get("RAGPIPE_SOURCE")
    if not source:
        raise AirflowFailException(
            f"no source: pass the 'source' param, set the Airflow Variable {SOURCE_VARIABLE!r} or RAGPIPE_SOURCE"
        )
    return str(source)


def _source_credentials() -> Any:
    """An S3 source's credentials from the Airflow Connection the ``aws_conn_id`` param names (login:
    access key id, password: secret key, extra: ``endpoint_url``, ``region_name``,
    ``aws_session_token``); None without the param (the AWS_* variables decide). They go to the
    discovery step only, never into XCom."""
    conn_id = _params().get("aws_conn_id")
    if not conn_id:
        return None
    from airflow.sdk import Connection

    from pipeline.sources import ObjectStoreCredentials

    conn = Connection.get(conn_id)
    extra = conn.extra_dejson or {}
    return ObjectStoreCredentials(access_key=conn.login or None, secret_key=conn.password or None,
                                  session_token=extra.get("aws_session_token"),
                                  endpoint_url=extra.get("endpoint_url") or None,
                                  region=extra.get("region_name") or None)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one pipeline step; a terminal error fails the task without retry."""
    from pipeline.steps import is_transient

    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if is_transient(exc):
            raise
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


# -- the DAGs ---------------------------------------------------------------------------------


def _indexing_dag(dag_id: str, schedule: str | None, *, full: bool, doc: str) -> Any:
    params = {
        "source": Param("", type="string", description="directory, .jsonl file or object-store URI (s3://bucket/"
                                                         "prefix/, gs://, file://); empty: Variable "
                                                         "ragpipe_source or RAGPIPE_SOURCE"),
        "aws_conn_id": Param("", type="string", description="Airflow Connection with an s3:// source's "
                                                              "credentials; empty: the AWS_* variables"),
        "index": Param("", type="string", description="index name; empty: RAGPIPE_INDEX or 'docs'"),
    }
    if full:
        params["model"] = Param("", type="string", description="another embedding model: build a shadow "
                                                                "version for it instead of publishing")

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        params=params,
        tags=["ragpipe"],
        doc_md=doc,
    )
    def indexing() -> None:
        @task
        def discover_and_diff() -> dict[str, Any]:
            from pipeline import steps
            from pipeline.runner import RunOptions

            shadow = full and bool(_params().get("model"))
            return _call(steps.plan, _source(), _config(), owner=f"airflow:{dag_id}",
                         options=RunOptions(full=full, shadow=shadow), registry_config=_registry_config(),
                         source_credentials=_source_credentials())

        @task.short_circuit(ignore_downstream_trigger_rules=True)
        def changed(planned: dict[str, Any]) -> bool:
            return bool(planned["changed"])

        @task
        def chunk(planned: dict[str, Any]) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.stage, planned["run_id"], _config(), registry_config=_registry_config())

        @task
        def work_lists(staged: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"run_id": staged["run_id"], "batch_uri": uri} for uri in staged["batches"]]

        @task(max_active_tis_per_dagrun=8, pool=EMBED_POOL)
        def embed(work: dict[str, Any]) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.embed, work["run_id"], work["batch_uri"], _config(), registry_config=_registry_config())

        @task(trigger_rule="none_failed")  # runs when every text was cached (no embedding tasks)
        def segment_parts(staged: dict[str, Any], embedded: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
            """A full build's segments, one part each (none: the build task writes the version whole)."""
            from pipeline import steps

            return _call(steps.segment_parts, staged["run_id"], _config(), registry_config=_registry_config())

        @task(max_active_tis_per_dagrun=8)
        def build_segment(part: dict[str, Any]) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.build_segment, part, _config(), registry_config=_registry_config())

        @task(trigger_rule="none_failed")  # runs when every text was cached, or the build has one segment
        def build(staged: dict[str, Any], embedded: list[dict[str, Any]] | None,
                  segments: list[dict[str, Any]] | None) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.build, staged["run_id"], _config(), embedded=list(embedded or []),
                         segments=list(segments or []), registry_config=_registry_config())

        @task
        def validate(built: dict[str, Any]) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.validate, built["run_id"], _config(), registry_config=_registry_config())

        @task(outlets=[PUBLISHED])
        def publish(validated: dict[str, Any], *, outlet_events: Any = None) -> dict[str, Any]:
            from pipeline import steps

            result = _call(steps.publish, validated["run_id"], _config(), registry_config=_registry_config())
            outlet_events[PUBLISHED].add(published_asset(result["index"]), extra=result)
            return result

        @task
        def gc(published: dict[str, Any]) -> dict[str, Any]:
            from pipeline import steps

            return _call(steps.gc, published["run_id"], _config(), registry_config=_registry_config())

        @task
        def compact(collected: dict[str, Any]) -> dict[str, Any]:
            """Merge segments when the merge policy asks (a new version with the same chunks)."""
            from pipeline import steps

            return _call(steps.compact, _config(), registry_config=_registry_config())

        planned = discover_and_diff()
        staged = chunk(planned)
        changed(planned) >> staged
        embedded = embed.expand(work=work_lists(staged))
        segments = build_segment.expand(part=segment_parts(staged, embedded))
        compact(gc(publish(validate(build(staged, embedded, segments)))))

    return indexing()


rag_index = _indexing_dag(
    "rag_index",
    _schedule("RAGPIPE_SCHEDULE", "@hourly"),
    full=False,
    doc="Incremental indexing: re-chunk only changed documents, embed only chunk texts never embedded "
        "with the model, build a new version from the live one, validate it and publish it behind the alias.",
)

rag_index_rebuild = _indexing_dag(
    "rag_index_rebuild",
    _schedule("RAGPIPE_REBUILD_SCHEDULE", "@weekly"),
    full=True,
    doc="Zero-downtime full rebuild: a new version from the registry alone, validated, then published "
        "with an atomic alias swap. With the `model` param it builds a shadow version for a model "
        "migration instead (promote it with `ragpipe alias promote`).",
)

"""The Airflow DAGs: parsing is cheap and side-effect free, the task graph is the documented one, and
``airflow dags test`` runs the whole DAG against the real registry (new, edited, deleted, unchanged,
rebuilt with the registry given as an Airflow Connection)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from urllib.parse import quote

import pytest
from psycopg import conninfo

from conftest import REPO, write_tree
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store
from pipeline.verify import verify_index
from registry import Registry, RegistryConfig

AIRFLOW = Path(sys.executable).with_name("airflow")

PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
bag = DagBag(dag_folder=sys.argv[1])
loaded = set(sys.modules) - before
heavy = sorted(m for m in loaded if m.split(".")[0] in
               {"torch", "sentence_transformers", "transformers", "hnswlib", "onnxruntime", "pgserver",
                "pipeline", "registry", "retrieval", "psycopg", "psycopg_pool"})
graph = {d.dag_id: {"tasks": {t.task_id: sorted(t.downstream_task_ids) for t in d.tasks},
                    "schedule": str(d.schedule), "catchup": d.catchup, "max_active_runs": d.max_active_runs,
                    "params": sorted(d.params.keys()),
                    "retries": {t.task_id: t.retries for t in d.tasks},
                    "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in d.tasks},
                    "mapped": sorted(t.task_id for t in d.tasks if getattr(t, "is_mapped", False)),
                    "pools": {t.task_id: t.pool for t in d.tasks},
                    "outlets": {t.task_id: [type(o).__name__ + ":" + o.name for o in t.outlets] for t in d.tasks if t.outlets}}
         for d in bag.dags.values()}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy, "dags": graph}))
"""


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAGPIPE_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "HF_HUB_OFFLINE": "1",
        **extra,
    })
    return env


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("airflow")
    # an unreachable registry: parsing must not try to reach it
    env = airflow_env(home, RAGPIPE_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "dags")], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPECTED_GRAPH = {
    "discover_and_diff": ["changed", "chunk"],
    "changed": ["chunk"],
    "chunk": ["build", "segment_parts", "work_lists"],
    "work_lists": ["embed"],
    "embed": ["build", "segment_parts"],
    "segment_parts": ["build_segment"],
    "build_segment": ["build"],
    "build": ["validate"],
    "validate": ["publish"],
    "publish": ["gc"],
    "gc": ["compact"],
    "compact": [],
}


def test_dag_folder_imports_without_errors_and_without_heavy_modules(parsed):
    assert parsed["errors"] == {}
    assert sorted(parsed["dags"]) == ["rag_index", "rag_index_rebuild"]
    # no registry code, no database driver, no model or index library is imported to parse the DAGs
    assert parsed["heavy"] == []


def test_task_graph_and_schedule(parsed):
    for dag_id, schedule, params in (("rag_index", "@hourly", ["aws_conn_id", "index", "source"]),
                                     ("rag_index_rebuild", "@weekly", ["aws_conn_id", "index", "model", "source"])):
        dag = parsed["dags"][dag_id]
        assert dag["tasks"] == EXPECTED_GRAPH, dag_id
        assert dag["schedule"] == schedule and dag["catchup"] is False and dag["max_active_runs"] == 1
        assert dag["params"] == params
        assert dag["mapped"] == ["build_segment", "embed"]  # embedding over work lists, a full build over segments
        assert set(dag["pools"].values()) == {"default_pool"}
        assert dag["trigger_rules"]["build"] == "none_failed"  # also when every text was cached
        assert dag["trigger_rules"]["segment_parts"] == "none_failed"
        assert all(r == 3 for r in dag["retries"].values())
        assert dag["outlets"] == {"publish": ["AssetAlias:ragpipe_index_published"]}


def test_schedule_none_and_the_embedding_pool_are_read_at_parse_time(tmp_path):
    env = airflow_env(tmp_path, RAGPIPE_SCHEDULE="none", RAGPIPE_REBUILD_SCHEDULE="None",
                      RAGPIPE_EMBED_POOL="embedding")
    out = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "dags")], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    dags = json.loads(out.stdout.strip().splitlines()[-1])["dags"]
    assert {d: dags[d]["schedule"] for d in dags} == {"rag_index": "None", "rag_index_rebuild": "None"}
    assert {d: dags[d]["pools"]["embed"] for d in dags} == {"rag_index": "embedding", "rag_index_rebuild": "embedding"}


def _dags_test(home: Path, env: dict[str, str], dag_id: str, conf: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([str(AIRFLOW), "dags", "test", dag_id, "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "state=success" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.mark.slow
def test_rag_index_dag_end_to_end(tmp_path, database_url):
    """New documents, then an edit and a delete, then nothing: the live version follows the source
    exactly, and a run where nothing changed builds no version."""
    home = tmp_path / "airflow"
    ragpipe_home = tmp_path / "ragpipe"
    env = airflow_env(home, RAGPIPE_DATABASE_URL=database_url, RAGPIPE_HOME=str(ragpipe_home))
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, check=True, timeout=300)
    src = write_tree(tmp_path / "src", {
        "wings.md": "# Wings\n\nFlutter of swept wings at transonic speed.\n\n## Tests\n\nWind tunnel results.\n",
        "heat.md": "# Heat\n\nHeat transfer in hypersonic boundary layers.\n",
        "gone.md": "# Gone\n\nThis page will be deleted.\n",
    })
    conf = {"source": str(src), "index": "airdocs"}
    config = IndexConfig(index="airdocs")
    registry_config = RegistryConfig(database_url=database_url, home=ragpipe_home)

    def live_state(registry: Registry) -> tuple[str, dict[str, set[str]]]:
        alias = {a.alias: a.version for a in registry.list_aliases()}["airdocs"]
        chunks: dict[str, set[str]] = {}
        for c in registry.active_chunks("airdocs"):
            chunks.setdefault(c.doc_id, set()).add(c.text)
        return alias, chunks

    _dags_test(home, env, "rag_index", conf)
    with Registry.open(registry_config) as registry:
        first, chunks = live_state(registry)
        assert set(chunks) == {"wings.md", "heat.md", "gone.md"}
        assert verify_index(registry, artifact_store(config, registry.home), "airdocs", "airdocs").ok
        runs = [r for r in registry.conn.execute("SELECT owner, status, lease_until FROM runs ORDER BY run_id")]
        assert runs == [("airflow:rag_index", "succeeded", None)]

    (src / "gone.md").unlink()
    (src / "heat.md").write_text("# Heat\n\nRadiative heat transfer at re-entry.\n")
    _dags_test(home, env, "rag_index", conf)
    with Registry.open(registry_config) as registry:
        second, chunks = live_state(registry)
        assert second != first
        assert set(chunks) == {"wings.md", "heat.md"}
        assert any("Radiative" in t for t in chunks["heat.md"])
        assert not any("hypersonic" in t for t in chunks["heat.md"])
        assert verify_index(registry, artifact_store(config, registry.home), "airdocs", "airdocs").ok
        second_published = registry.get_run(2).counts["version"]  # then merged by the compact task: `second`
        embedded = registry.get_run(2).counts["embedding"]
        assert embedded["chunks_embedded"] == 1  # only the edited document's new chunk text

    done = _dags_test(home, env, "rag_index", conf)
    with Registry.open(registry_config) as registry:
        third, _ = live_state(registry)
        assert third == second  # nothing changed: no version built
        last = registry.list_runs("airdocs", 1)[0]  # after the second run's compaction (its deletes) ran
        assert last.source != "" and not last.source.startswith("compact:")
        assert last.status == "succeeded" and last.counts["version"] is None
    assert "Skipping downstream tasks" in done.stdout + done.stderr or "skipped" in (done.stdout + done.stderr)

    # the zero-downtime rebuild, with the registry given only as the Airflow Connection ragpipe_registry
    params = conninfo.conninfo_to_dict(database_url)
    uri = (f"postgresql://{quote(params.get('user', ''), safe='')}@{quote(params.get('host', ''), safe='')}"
           f"{':' + str(params['port']) if params.get('port') else ''}/{params['dbname']}")
    by_connection = {k: v for k, v in env.items() if k != "RAGPIPE_DATABASE_URL"}
    by_connection["AIRFLOW_CONN_RAGPIPE_REGISTRY"] = uri
    by_connection["RAGPIPE_SEGMENT_ROWS"] = "1"  # the full build fans out: a build_segment task per chunk
    _dags_test(home, by_connection, "rag_index_rebuild", conf)
    with Registry.open(registry_config) as registry:
        rebuilt, chunks = live_state(registry)
        assert rebuilt != third
        assert set(chunks) == {"wings.md", "heat.md"}
        assert registry.get_version(rebuilt).full_build is True
        segments = registry.get_version(rebuilt).manifest["segments"]
        assert len(segments) == sum(len(texts) for texts in chunks.values()) >= 2
    with sqlite3.connect(home / "airflow.db") as db:
        parts = db.execute("SELECT count(*) FROM task_instance WHERE dag_id = 'rag_index_rebuild' "
                           "AND task_id = 'build_segment' AND state = 'success'").fetchone()[0]
    assert parts == len(segments)
    with Registry.open(registry_config) as registry:
        assert verify_index(registry, artifact_store(config, registry.home), "airdocs", "airdocs").ok
        assert registry.list_runs("airdocs", 1)[0].counts["embedding"]["chunks_embedded"] == 0  # all cached
    # the embedded server under RAGPIPE_HOME was never started: the Connection named the registry
    assert not (ragpipe_home / "pgdata").exists()

    # each publish emitted an asset event carrying the version
    with sqlite3.connect(home / "airflow.db") as db:
        extras = [json.loads(row[0]) for row in db.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = 'ragpipe_index_airdocs' "
            "ORDER BY e.id")]
    assert [e["version"] for e in extras] == [first, second_published, rebuilt]
    assert extras[1]["previous"] == first and extras[1]["action"] == "publish"


@pytest.mark.slow
def test_rag_index_dag_reads_s3_with_an_airflow_connection(tmp_path, database_url, s3_endpoint):
    """An s3:// source with its credentials in an Airflow Connection (no AWS_* variables): indexed,
    then a run where nothing changed reads no object; the secret reaches no XCom and no task log."""
    import uuid

    import boto3

    from s3server import request_log

    secret, key_id = "dagSecret-" + uuid.uuid4().hex, "AKIADAG" + uuid.uuid4().hex[:8].upper()
    bucket = f"dag-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for key, body in {"wings.md": "# Wings\n\nFlutter of swept wings.\n", "heat.md": "# Heat\n\nHot layers.\n"}.items():
        s3.put_object(Bucket=bucket, Key=f"kb/{key}", Body=body.encode())
    home = tmp_path / "airflow"
    connection = {"conn_type": "aws", "login": key_id, "password": secret,
                  "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    env = airflow_env(home, RAGPIPE_DATABASE_URL=database_url, RAGPIPE_HOME=str(tmp_path / "ragpipe"),
                      AIRFLOW_CONN_S3_DOCS=json.dumps(connection))
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, check=True, timeout=300)
    conf = {"source": f"s3://{bucket}/kb/", "index": "s3docs", "aws_conn_id": "s3_docs"}

    first = _dags_test(home, env, "rag_index", conf)
    with Registry.open(RegistryConfig(database_url=database_url, home=tmp_path / "ragpipe")) as registry:
        assert {c.doc_id for c in registry.active_chunks("s3docs")} == {"wings.md", "heat.md"}
        assert set(registry.source_objects("s3docs", f"s3://{bucket}/kb/")) == {"wings.md", "heat.md"}
    with request_log() as log:
        second = _dags_test(home, env, "rag_index", conf)
    assert log.object_reads(bucket) == []
    with Registry.open(RegistryConfig(database_url=database_url, home=tmp_path / "ragpipe")) as registry:
        assert registry.get_run(2).counts["version"] is None

    with sqlite3.connect(home / "airflow.db") as db:
        xcoms = json.dumps([list(map(str, row)) for row in db.execute("SELECT * FROM xcom")])
    assert "s3docs" in xcoms or "run_id" in xcoms  # the XCom table is where the steps' results are
    logs = "".join(p.read_text(errors="replace") for p in home.rglob("*.log")) if (home / "logs").exists() else ""
    for text in (xcoms, logs, first.stdout + first.stderr, second.stdout + second.stderr):
        assert secret not in text and key_id not in text

"""A run as separate steps (what the DAG tasks call), on a real PostgreSQL: same result as the
in-process runner, retry-safe steps, the lease between steps, takeover, terminal and transient errors."""

import json

import pytest

from conftest import write_tree
from pipeline import steps
from pipeline.config import IndexConfig
from pipeline.errors import VersionRejected
from pipeline.runner import RunOptions, artifact_store, run_index
from pipeline.verify import verify_index
from registry import IndexLocked, Registry, RunNotRunning
from version_files import chunk_rows

pytestmark = pytest.mark.db


@pytest.fixture
def source(tmp_path):
    return write_tree(tmp_path / "src", {
        "a.md": "# A\n\n" + "\n\n".join(f"Paragraph {i} on wing flutter, drag and lift at speed {i}." for i in range(200)),
        "b.md": "# B\n\nHeat shields and ablation.\n",
        "c.txt": "A short note on vortex generators.\n",
    })


def config(**kw):
    return IndexConfig(index="docs", lock_timeout=2, embed_task_size=7, **kw)


def whole_run(source, registry_config, embedder, owner="airflow:test", cfg=None, options=RunOptions()):
    """Every step, in order, as the DAG runs them; returns the step results."""
    cfg = cfg or config()
    factory = lambda c: embedder  # noqa: E731
    kw = {"registry_config": registry_config}
    planned = steps.plan(str(source), cfg, owner=owner, options=options, embedder=factory, **kw)
    if not planned["changed"]:
        return {"plan": planned}
    run_id = planned["run_id"]
    staged = steps.stage(run_id, cfg, embedder=factory, **kw)
    embedded = [steps.embed(run_id, uri, cfg, embedder=factory, **kw) for uri in staged["batches"]]
    built = steps.build(run_id, cfg, embedded=embedded, embedder=factory, **kw)
    validated = steps.validate(run_id, cfg, embedder=factory, **kw)
    published = steps.publish(run_id, cfg, **kw)
    collected = steps.gc(run_id, cfg, **kw)
    return {"plan": planned, "stage": staged, "embed": embedded, "build": built, "validate": validated,
            "publish": published, "gc": collected}


def chunk_table(registry, version):
    return sorted((r["chunk_id"], r["text"]) for r in chunk_rows(registry, IndexConfig(), version))


def test_steps_give_what_the_in_process_runner_gives(source, registry_config, embedder, tmp_path,
                                                     empty_database_url):
    results = whole_run(source, registry_config, embedder)
    assert results["stage"]["to_embed"] == sum(e["chunks_embedded"] for e in results["embed"]) > 7
    assert len(results["stage"]["batches"]) > 1  # work lists of embed_task_size texts
    json.dumps(results)  # every result is XCom-ready
    version = results["publish"]["version"]
    with Registry.open(registry_config) as registry:
        assert verify_index(registry, artifact_store(config(), registry.home), "docs", "docs").ok
        stepped = chunk_table(registry, version)
        run = registry.get_run(results["plan"]["run_id"])
        assert run.status == "succeeded" and run.counts["version"] == version
        assert run.counts["embedding"]["chunks_embedded"] == results["stage"]["to_embed"]
        # the workspace is gone once the run is done
        assert not (registry.home / "artifacts" / "docs" / "_runs").exists() or \
            not any((registry.home / "artifacts" / "docs" / "_runs").iterdir())
    # the same source through run_index in another registry: the same chunks
    from registry import RegistryConfig

    other = RegistryConfig(database_url=empty_database_url, home=tmp_path / "other-home")
    with Registry.open(other) as registry:
        summary = run_index(str(source), registry, embedder, config())
        assert chunk_table(registry, summary.version) == stepped

    # edit and delete, then a run where nothing changed
    (source / "b.md").write_text("# B\n\nHeat shields, ablation and re-entry.\n")
    (source / "c.txt").unlink()
    second = whole_run(source, registry_config, embedder)
    assert second["plan"]["documents"]["changed"] == 1 and second["plan"]["documents"]["deleted"] == 1
    assert second["publish"]["previous"] == version
    with Registry.open(registry_config) as registry:  # b.md's new text embedded; a.md's texts were never touched
        counts = registry.get_run(second["plan"]["run_id"]).counts["embedding"]
        assert counts["chunks_embedded"] == 1 and counts["chunks_cached"] == 0
    third = whole_run(source, registry_config, embedder)
    assert third == {"plan": {**third["plan"], "changed": False}}
    with Registry.open(registry_config) as registry:
        assert verify_index(registry, artifact_store(config(), registry.home), "docs", "docs").ok
        docs = {c.doc_id for c in registry.active_chunks("docs")}
        assert docs == {"a.md", "b.md"}
        assert registry.get_run(third["plan"]["run_id"]).status == "succeeded"


def test_every_step_can_run_again(source, registry_config, embedder):
    cfg, factory, kw = config(), (lambda c: embedder), {"registry_config": registry_config}
    planned = steps.plan(str(source), cfg, owner="airflow:test", embedder=factory, **kw)
    run_id = planned["run_id"]
    first = steps.stage(run_id, cfg, embedder=factory, **kw)
    assert steps.stage(run_id, cfg, embedder=factory, **kw) == first  # done already: same answer
    embedded = [steps.embed(run_id, uri, cfg, embedder=factory, **kw) for uri in first["batches"]]
    again = [steps.embed(run_id, uri, cfg, embedder=factory, **kw) for uri in first["batches"]]
    assert sum(e["chunks_embedded"] for e in again) == 0  # a retried embedding task embeds nothing twice
    built = steps.build(run_id, cfg, embedded=embedded, embedder=factory, **kw)
    with Registry.open(registry_config) as registry:  # a build that died after writing its files
        saved = registry.conn.execute("SELECT state FROM runs WHERE run_id = %s", (run_id,)).fetchone()[0]
        registry.save_run_state(run_id, {**saved, "step": "embedded"})
    assert steps.build(run_id, cfg, embedded=embedded, embedder=factory, **kw) == built
    steps.validate(run_id, cfg, embedder=factory, **kw)
    steps.validate(run_id, cfg, embedder=factory, **kw)
    published = steps.publish(run_id, cfg, **kw)
    with Registry.open(registry_config) as registry:  # a publish that committed, then died before saying so
        saved = registry.conn.execute("SELECT state FROM runs WHERE run_id = %s", (run_id,)).fetchone()[0]
        registry.save_run_state(run_id, {**saved, "step": "validated"})
    assert steps.publish(run_id, cfg, **kw)["version"] == published["version"]
    steps.gc(run_id, cfg, **kw)
    assert steps.gc(run_id, cfg, **kw) == {"run_id": run_id, "already_finished": True}
    with Registry.open(registry_config) as registry:
        assert verify_index(registry, artifact_store(cfg, registry.home), "docs", "docs").ok
        assert [v.status for v in registry.list_versions("docs")] == ["published"]
        rows = registry.conn.execute("SELECT count(*), count(DISTINCT chunk_id) FROM chunks").fetchone()
        assert rows[0] == rows[1]  # no chunk row twice
    with pytest.raises(RunNotRunning, match="succeeded"):
        steps.build(run_id, cfg, embedder=factory, **kw)  # a finished run takes no more steps


def test_a_stage_retried_after_a_crash_discards_the_first_attempt(source, registry_config, embedder):
    cfg, factory, kw = config(), (lambda c: embedder), {"registry_config": registry_config}
    run_id = steps.plan(str(source), cfg, owner="airflow:test", embedder=factory, **kw)["run_id"]
    first = steps.stage(run_id, cfg, embedder=factory, **kw)
    with Registry.open(registry_config) as registry:  # it staged, then died before saving its state
        saved = registry.conn.execute("SELECT state FROM runs WHERE run_id = %s", (run_id,)).fetchone()[0]
        registry.save_run_state(run_id, {**saved, "step": "planned", "summary": {**saved["summary"], "version": None}})
    second = steps.stage(run_id, cfg, embedder=factory, **kw)
    assert second["version"] != first["version"]
    for uri in second["batches"]:
        steps.embed(run_id, uri, cfg, embedder=factory, **kw)
    steps.build(run_id, cfg, embedder=factory, **kw)
    steps.validate(run_id, cfg, embedder=factory, **kw)
    steps.publish(run_id, cfg, **kw)
    steps.gc(run_id, cfg, **kw)
    with Registry.open(registry_config) as registry:
        statuses = {v.version: v.status for v in registry.list_versions("docs")}
        assert statuses[first["version"]] == "rejected" and statuses[second["version"]] == "published"
        assert verify_index(registry, artifact_store(cfg, registry.home), "docs", "docs").ok


def test_the_lease_keeps_other_runs_out_and_the_same_owner_takes_over(source, registry_config, embedder):
    cfg, factory, kw = config(), (lambda c: embedder), {"registry_config": registry_config}
    run_id = steps.plan(str(source), cfg, owner="airflow:rag_index", embedder=factory, **kw)["run_id"]
    # between two steps no lock is held, but the lease keeps the CLI (and other DAGs) out
    with Registry.open(registry_config) as registry:
        with pytest.raises(IndexLocked, match=f"run {run_id} \\(airflow:rag_index\\)"):
            run_index(str(source), registry, embedder, cfg)
    with pytest.raises(IndexLocked):
        steps.plan(str(source), cfg, owner="airflow:rag_index_rebuild", embedder=factory, **kw)
    steps.stage(run_id, cfg, embedder=factory, **kw)
    # the same DAG starting again (its earlier run must have died: one run at a time) takes over
    newer = steps.plan(str(source), cfg, owner="airflow:rag_index", embedder=factory, **kw)
    with pytest.raises(RunNotRunning, match="abandoned"):
        steps.build(run_id, cfg, embedder=factory, **kw)
    with Registry.open(registry_config) as registry:
        assert [v.status for v in registry.list_versions("docs")] == ["rejected"]  # the old run's staging
    whole_run(source, registry_config, embedder, owner="airflow:rag_index")  # and a later run completes
    with Registry.open(registry_config) as registry:
        assert registry.get_run(newer["run_id"]).status == "failed"  # taken over by that later run
        assert verify_index(registry, artifact_store(cfg, registry.home), "docs", "docs").ok
    # an expired lease no longer blocks anyone
    short = config(run_lease=0.001)
    stale = steps.plan(str(source), short, owner="airflow:x", options=RunOptions(full=True), embedder=factory, **kw)
    assert stale["changed"]
    with Registry.open(registry_config) as registry:
        summary = run_index(str(source), registry, embedder, cfg)
        assert summary.status == "succeeded"
        assert registry.get_run(stale["run_id"]).status == "failed"


def test_terminal_errors_end_the_run_and_transient_ones_keep_it(source, registry_config, embedder, tmp_path):
    factory, kw = (lambda c: embedder), {"registry_config": registry_config}
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"query": "zzz", "expected_doc_ids": ["nowhere.md"]}) + "\n")
    cfg = config(golden_set=str(golden), golden_min_recall=0.5)
    run_id = steps.plan(str(source), cfg, owner="airflow:test", embedder=factory, **kw)["run_id"]
    staged = steps.stage(run_id, cfg, embedder=factory, **kw)
    for uri in staged["batches"]:
        steps.embed(run_id, uri, cfg, embedder=factory, **kw)
    steps.build(run_id, cfg, embedder=factory, **kw)
    with pytest.raises(VersionRejected) as rejected:
        steps.validate(run_id, cfg, embedder=factory, **kw)
    assert not steps.is_transient(rejected.value)
    with Registry.open(registry_config) as registry:
        run = registry.get_run(run_id)
        assert run.status == "failed" and "rejected" in run.error
        assert registry.list_aliases() == []  # nothing was published
    with pytest.raises(RunNotRunning):
        steps.publish(run_id, cfg, **kw)

    # a transient failure (the database unreachable) leaves the run to the retry
    run_id = steps.plan(str(source), config(), owner="airflow:test", embedder=factory, **kw)["run_id"]
    from registry import RegistryConfig, RegistryUnavailable

    down = RegistryConfig(database_url="postgresql://nobody@127.0.0.1:1/none", home=registry_config.home)
    with pytest.raises(RegistryUnavailable) as unavailable:
        steps.stage(run_id, config(), embedder=factory, registry_config=down)
    assert steps.is_transient(unavailable.value)
    with Registry.open(registry_config) as registry:
        assert registry.get_run(run_id).status == "running"
    assert steps.stage(run_id, config(), embedder=factory, **kw)["version"]


def test_rebuild_with_another_model_builds_a_shadow(source, registry_config, embedder):
    """What rag_index_rebuild does with its `model` param: a full version with the other model,
    attached as the alias's shadow while the live version keeps serving."""
    from pipeline.deterministic import DeterministicEmbedder

    live = whole_run(source, registry_config, embedder)["publish"]["version"]
    other = DeterministicEmbedder(dim=64)
    shadow = whole_run(source, registry_config, other, options=RunOptions(full=True, shadow=True))
    assert shadow["publish"]["action"] == "shadow" and shadow["build"]["full_build"]
    with Registry.open(registry_config) as registry:
        alias = {a.alias: a for a in registry.list_aliases()}["docs"]
        assert alias.version == live and alias.shadow_version == shadow["publish"]["version"]
        assert registry.get_version(alias.shadow_version).model_id == other.model_id
        assert verify_index(registry, artifact_store(config(), registry.home), "docs", "docs").ok


KILLED_STEP = r"""
import sys
from pathlib import Path
from pipeline.deterministic import DeterministicEmbedder
from pipeline import steps
from pipeline.config import IndexConfig
from registry import RegistryConfig

step, run_id, url, home = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
kw = {"registry_config": RegistryConfig(database_url=url, home=Path(home))}
cfg = IndexConfig(index="docs", lock_timeout=2, embed_task_size=7)
factory = lambda c: DeterministicEmbedder()
if step == "publish":
    steps.publish(run_id, cfg, **kw)
else:
    getattr(steps, step)(run_id, cfg, embedder=factory, **kw)
"""


@pytest.mark.parametrize("step, point", [("build", "hnsw_written"), ("validate", "validated"),
                                         ("publish", "publishing")])
def test_a_step_killed_midway_is_finished_by_its_retry(step, point, source, registry_config, embedder):
    """SIGKILL a real process inside a step (as a worker dies under Airflow); the retried task finishes the run."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    cfg, factory, kw = config(), (lambda c: embedder), {"registry_config": registry_config}
    run_id = steps.plan(str(source), cfg, owner="airflow:test", embedder=factory, **kw)["run_id"]
    staged = steps.stage(run_id, cfg, embedder=factory, **kw)
    for uri in staged["batches"]:
        steps.embed(run_id, uri, cfg, embedder=factory, **kw)
    order = ["build", "validate", "publish"]
    for earlier in order[:order.index(step)]:
        getattr(steps, earlier)(run_id, cfg, embedder=factory, **kw)
    env = dict(os.environ, RAGPIPE_TEST_KILL_AT=point, HF_HUB_OFFLINE="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_STEP, step, str(run_id), registry_config.database_url,
                             str(registry_config.home)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with Registry.open(registry_config) as registry:
        assert registry.list_aliases() == []  # nothing is served before publish commits
        assert registry.get_run(run_id).status == "running"  # the run waits for the retry
    for retried in order[order.index(step):]:
        if retried == "publish":
            steps.publish(run_id, cfg, **kw)
        else:
            getattr(steps, retried)(run_id, cfg, embedder=factory, **kw)
    steps.gc(run_id, cfg, **kw)
    with Registry.open(registry_config) as registry:
        assert {a.alias: a.version for a in registry.list_aliases()}["docs"] == staged["version"]
        assert registry.get_run(run_id).status == "succeeded"
        assert verify_index(registry, artifact_store(cfg, registry.home), "docs", "docs").ok


def test_a_full_build_fans_out_into_segments_built_at_once_and_retried(source, registry_config, embedder,
                                                                        tmp_path, empty_database_url):
    """Parts take no index lock: two build at the same moment; a part built twice (a retried task)
    leaves one segment to gc; the version equals the one the in-process runner builds."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, factory, kw = config(segment_rows=5), (lambda c: embedder), {"registry_config": registry_config}
    run_id = steps.plan(str(source), cfg, owner="airflow:test", embedder=factory, **kw)["run_id"]
    staged = steps.stage(run_id, cfg, embedder=factory, **kw)
    embedded = [steps.embed(run_id, uri, cfg, embedder=factory, **kw) for uri in staged["batches"]]
    parts = steps.segment_parts(run_id, cfg, **kw)
    assert len(parts) >= 3 and [p["number"] for p in parts] == list(range(len(parts)))
    assert all(p["rows"] == 5 for p in parts[:-1]) and parts[-1]["until"] is None
    with Registry.open(registry_config) as registry, registry.index_lock("docs", 1):  # held by someone else
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda p: steps.build_segment(p, cfg, embedder=factory, **kw), parts))
    again = steps.build_segment(parts[1], cfg, embedder=factory, **kw)  # the retry of a task that died unheard
    assert again["segments"][0]["name"] != results[1]["segments"][0]["name"]
    built = steps.build(run_id, cfg, embedded=embedded, segments=[results[0], again, *results[2:]],
                        embedder=factory, **kw)
    assert built["full_build"]
    steps.validate(run_id, cfg, embedder=factory, **kw)
    version = steps.publish(run_id, cfg, **kw)["version"]
    steps.gc(run_id, cfg, **kw)
    with Registry.open(registry_config) as registry:
        store = artifact_store(cfg, registry.home)
        assert verify_index(registry, store, "docs", "docs").ok
        manifest = store.read_manifest("docs", version)
        assert [s["name"] for s in manifest["segments"]] == [
            r["segments"][0]["name"] for r in [results[0], again, *results[2:]]]
        segments_dir = store.index_directory("docs") / "segments"
        assert sorted(p.name for p in segments_dir.iterdir()) == sorted(s["name"] for s in manifest["segments"])
        fanned = chunk_table(registry, version)
    from registry import RegistryConfig

    other = RegistryConfig(database_url=empty_database_url, home=tmp_path / "other-home")
    with Registry.open(other) as registry:
        assert chunk_table(registry, run_index(str(source), registry, embedder, config()).version) == fanned

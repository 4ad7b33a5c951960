"""Import direction (dags → pipeline → {retrieval, registry}, service → {retrieval, registry}; nothing
imports benchmarks or cluster, and only the CLI's `serve` imports service), SQL only in registry/, and no pickle
anywhere."""

import ast
import functools
import re

import pytest

from conftest import REPO

PACKAGES = ["dags", "pipeline", "registry", "retrieval", "service", "benchmarks", "cluster"]


def imports_of(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


def test_only_dags_import_airflow():
    for package in PACKAGES:
        if package == "dags":
            continue
        for path, names in imports_of(package).items():
            assert "airflow" not in names, path


def test_import_direction():
    forbidden = {
        "registry": {"pipeline", "retrieval", "service", "dags", "benchmarks", "cluster"},
        "retrieval": {"pipeline", "service", "dags", "benchmarks", "cluster"},
        "service": {"pipeline", "dags", "benchmarks", "cluster"},
        "pipeline": {"service", "dags", "benchmarks", "cluster"},
        "dags": {"service", "benchmarks", "cluster"},
        # the local cluster drives Airflow and ragpipe from outside: their CLIs and REST API, not their code
        "cluster": {"pipeline", "retrieval", "service", "dags", "benchmarks"},
    }
    for package, banned in forbidden.items():
        for path, names in imports_of(package).items():
            if package == "pipeline" and path.startswith("pipeline/cli"):
                banned = forbidden["pipeline"] - {"service"}  # `ragpipe serve` starts the service
            assert not names & banned, f"{path} imports {names & banned}"


def test_the_walk_covers_subpackages():
    # retrieval.segments and pipeline.segments are held to their top-level package's direction
    for path in ["retrieval/segments/search.py", "retrieval/segments/segment.py", "retrieval/segments/cache.py",
                 "pipeline/segments/writer.py", "pipeline/code/layout.py", "pipeline/code/grammars.py"]:
        assert path in imports_of(path.split("/")[0]), path
    assert "pipeline" not in set().union(*(names for path, names in imports_of("retrieval").items()
                                           if path.startswith("retrieval/segments/")))


def test_the_service_is_imported_only_by_the_serve_command():
    # (benchmarks measure the service; nothing imports them)
    importers = sorted(path for package in PACKAGES if package not in ("service", "benchmarks")
                       for path, names in imports_of(package).items() if "service" in names)
    assert importers == ["pipeline/cli.py"], importers
    assert {"retrieval", "registry"} <= set().union(*imports_of("service").values())


def test_no_pickle():
    for package in PACKAGES:
        for path, names in imports_of(package).items():
            assert not names & {"pickle", "dill", "cloudpickle", "joblib"}, path


def test_sql_is_spoken_only_by_the_registry():
    for package in ["pipeline", "retrieval", "service", "dags", "cluster"]:
        for path in (REPO / package).rglob("*.py"):
            assert "psycopg" not in imports_of(package)[str(path.relative_to(REPO))], path


def test_the_wheel_lists_every_package():
    # setuptools ships only the packages pyproject.toml names: a subpackage left out imports from a
    # checkout and fails in an installed wheel
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for package in ["pipeline", "registry", "retrieval", "service"]
             for init in (REPO / package).rglob("__init__.py")}
    assert {"pipeline.code", "pipeline.segments", "retrieval.segments"} <= found
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"


# -- extras: what each part of the package may import ---------------------------------------------

@functools.cache
def _requirements() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """The distributions the base install brings (its requirements and theirs, as installed here)
    and, per extra, those the extra brings on top of the base."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras_of = project["optional-dependencies"]

    def closure(reqs: list[str], seen: set[str]) -> set[str]:
        out: set[str] = set()
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) == "ragpipe":
                for extra in req.extras - seen:
                    out |= closure(extras_of[extra], seen | {extra})
            else:
                out |= _installed_closure(req)
        return out

    base = frozenset(closure(project["dependencies"], set()))
    return base, {extra: base | closure(extras_of[extra], {extra}) for extra in extras_of}


def _installed_closure(req, seen: set | None = None) -> set[str]:  # type: ignore[no-untyped-def]
    """A requirement's distribution and, as installed here, every distribution it requires."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen = set() if seen is None else seen
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
        return set()
    seen.add(key)
    out = {name}
    try:
        requires = importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        return out
    for text in requires:
        sub = Requirement(text)
        if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
            out |= _installed_closure(sub, seen)
    return out


@functools.cache
def _distributions_of(top_level: str) -> frozenset[str]:
    import importlib.metadata

    from packaging.utils import canonicalize_name

    return frozenset(canonicalize_name(d) for d in _packages_distributions().get(top_level, []))


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()


FIRST_PARTY = {"pipeline", "registry", "retrieval", "service", "dags", "benchmarks"}


def _third_party_imports(package: str) -> list[tuple[str, int, str]]:
    """(file, line, top-level name) of every import of a third-party module, at any depth."""
    import sys

    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.append((str(path.relative_to(REPO)), node.lineno, top))
    return found


def test_the_installed_packages_import_only_the_base_install_directly():
    # pipeline/, registry/ and retrieval/ ship in the base wheel: a base install must import every
    # one of their modules. A package of an extra is reached only through registry.extras.require,
    # which names the extra to install instead of failing with an ImportError.
    base, _ = _requirements()
    for package in ["pipeline", "registry", "retrieval"]:
        for path, line, top in _third_party_imports(package):
            dists = _distributions_of(top)
            assert dists & base, (f"{path}:{line} imports {top!r} ({', '.join(sorted(dists)) or 'not installed'}), "
                                  "which the base install lacks: use registry.extras.require")


def test_the_service_imports_only_the_base_install_and_the_serve_extra():
    _, extras = _requirements()
    found = _third_party_imports("service")
    assert {top for _, _, top in found} >= {"fastapi", "prometheus_client"}
    for path, line, top in found:
        assert _distributions_of(top) & extras["serve"], f"{path}:{line} imports {top!r}, not in [serve]"


def test_dags_import_only_the_airflow_extra():
    _, extras = _requirements()
    for path, line, top in _third_party_imports("dags"):
        assert _distributions_of(top) & extras["airflow"], f"{path}:{line} imports {top!r}, not in [airflow]"


def test_every_optional_import_names_the_extra_that_provides_it():
    _, extras = _requirements()
    calls = 0
    for package in ["pipeline", "registry", "retrieval", "service"]:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require"):
                    continue
                args = node.args[:2]
                assert len(args) == 2 and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args), \
                    f"{path}:{node.lineno}: require() takes the module and the extra as string literals"
                module, extra = args[0].value, args[1].value
                assert extra in extras, f"{path}:{node.lineno}: no extra [{extra}] in pyproject.toml"
                dists = _distributions_of(module.split(".")[0])
                assert dists & extras[extra], f"{path}:{node.lineno}: [{extra}] does not install {module!r}"
                calls += 1
    assert calls >= 5  # the walk found the optional features (models, export, reranker, embedded server, ...)


def test_no_module_imports_by_name_behind_the_extras_door():
    # importlib.import_module with a literal would bypass the checks above
    for package in ["pipeline", "registry", "retrieval", "service", "dags"]:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "registry" / "extras.py":
                continue
            text = path.read_text()
            assert "import_module(" not in text and "__import__(" not in text, path
# What SQL looks like, in two kinds of pattern. Statements in capitals (the house style) by their
# leading keyword alone; SQL in any case by shapes that English prose does not take: a keyword with
# the clause that must follow it (INSERT INTO t (, DELETE FROM t WHERE, UPDATE t SET c =, ...),
# PostgreSQL's functions, ON CONFLICT. "Update the cache", "delete from the source" or "LISTEN/NOTIFY"
# in a docstring do not match.
_STATEMENT = ("SELECT|INSERT|UPDATE|DELETE|MERGE|WITH|CREATE|DROP|ALTER|TRUNCATE|COPY|GRANT|REVOKE|LISTEN|UNLISTEN"
              "|NOTIFY|BEGIN|START|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|VACUUM|ANALYZE|EXPLAIN|SET|SHOW|RESET|LOCK"
              "|DO|CALL|PREPARE|EXECUTE|DECLARE|FETCH|DISCARD|REFRESH|CLUSTER|REINDEX|COMMENT|SECURITY")
_OBJECT = r"(TABLE|INDEX|DATABASE|VIEW|MATERIALIZED|SCHEMA|FUNCTION|PROCEDURE|TRIGGER|SEQUENCE|EXTENSION|ROLE|USER|TYPE)"
_NAME = r"[a-z_\"][\w.\"]*"
_SQL_PATTERNS = [
    re.compile(rf"^\s*({_STATEMENT})(?=\s|;|\(|$)", re.MULTILINE),
    *(re.compile(p, re.IGNORECASE | re.MULTILINE) for p in [
        rf"^\s*select\s+.+?\s+from\s+{_NAME}(\s+(where|join|order|group|limit|as|natural|left|cross)\b|\s*;?\s*$)",
        rf"^\s*select\s+({_NAME}|\d+|\*)(\s*,\s*({_NAME}|\d+))*\s*;?\s*$",
        rf"\binsert\s+into\s+{_NAME}\s*(\(|values\b|select\b|default\b)",
        rf"\bupdate\s+{_NAME}\s+set\s+{_NAME}\s*=",
        rf"\bdelete\s+from\s+{_NAME}(\s+(where|using|returning)\b|\s*;?\s*$)",
        rf"\b(create|drop|alter)\s+((or\s+replace|temp|temporary|unique|unlogged|if\s+(not\s+)?exists)\s+)*{_OBJECT}\b",
        rf"^\s*(listen|unlisten|notify)\s+{_NAME}\s*(;|,|$)",
        r"\bpg_[a-z_]+\s*\(",
        r"\bon\s+conflict\s*(\(|do\b)",
        r"\bcopy\s+.+\b(from\s+stdin|to\s+stdout)\b",
    ]),
]


def looks_like_sql(text: str) -> bool:
    return any(p.search(text) for p in _SQL_PATTERNS)


def string_constants(path):
    """Every string literal of a module, f-strings' literal parts joined with a placeholder."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values), node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value, node.lineno


@pytest.mark.parametrize(("text", "sql"), [
    ("LISTEN ragpipe_alias", True),
    ("  listen ragpipe_alias", True),
    ("SELECT pg_database_size(current_database())", True),
    ("select 1", True),
    ("COMMIT", True),
    ("SELECT chunk_hash, created_at FROM embeddings", True),
    ("delete from chunks where index_name = %(index)s", True),
    ("insert into runs (x) values (1)", True),
    ("update runs set status = 'failed'", True),
    ("create temp table stage (x int)", True),
    ("x ON CONFLICT DO NOTHING", True),
    ("NOTIFY ragpipe_alias, 'x'", True),
    ("Select the best hits and update the cache.", False),
    ("follow: follow the alias (LISTEN/NOTIFY plus a poll every few seconds).", False),
    ("documents to delete from the source", False),
    ("Set the embedding model", False),
    ("publish: one transaction + NOTIFY", False),
    ("update", False),
    ("%(levelname)s %(name)s: %(message)s", False),
    ("Create the table of hits", False),
    ("listen to the registry", False),
    ("select 1;", True),
    ("DO $$ BEGIN END $$", True),
    ("copy stage_x (a, b) from stdin", True),
])
def test_sql_detector(text, sql):
    assert looks_like_sql(text) is sql


def test_no_sql_outside_the_registry():
    found = []
    for package in ["pipeline", "retrieval", "service", "dags", "benchmarks"]:
        for path in sorted((REPO / package).rglob("*.py")):
            for text, line in string_constants(path):
                if looks_like_sql(text):
                    found.append(f"{path.relative_to(REPO)}:{line}: {text.strip()[:60]!r}")
    assert found == [], "SQL outside registry/ (add a named query to registry/queries.sql):\n" + "\n".join(found)


def test_nothing_outside_the_registry_reaches_for_its_connection():
    # the registry's connection is how SQL would leak out again: `.conn`, `.execute(...)`, `.cursor()`
    found = []
    for package in ["pipeline", "retrieval", "service", "dags", "benchmarks"]:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Attribute) and node.attr in {"conn", "execute", "executemany", "cursor",
                                                                     "notifies", "pgconn"}:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    assert found == []

"""Import direction (dags → pipeline → {retrieval, registry}; nothing imports benchmarks) and no pickle anywhere."""

import ast

from conftest import REPO

PACKAGES = ["dags", "pipeline", "registry", "retrieval", "benchmarks"]


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
        "registry": {"pipeline", "retrieval", "dags", "benchmarks"},
        "retrieval": {"pipeline", "dags", "benchmarks"},
        "pipeline": {"dags", "benchmarks"},
        "dags": {"benchmarks"},
    }
    for package, banned in forbidden.items():
        for path, names in imports_of(package).items():
            assert not names & banned, f"{path} imports {names & banned}"


def test_no_pickle():
    for package in PACKAGES:
        for path, names in imports_of(package).items():
            assert not names & {"pickle", "dill", "cloudpickle", "joblib"}, path


def test_sql_is_spoken_only_by_the_registry():
    for package in ["pipeline", "retrieval", "dags"]:
        for path in (REPO / package).rglob("*.py"):
            assert "psycopg" not in imports_of(package)[str(path.relative_to(REPO))], path

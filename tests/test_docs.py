"""The README documents every setting and the test command CI runs."""

from dataclasses import fields

from conftest import REPO
from pipeline.config import IndexConfig
from retrieval.config import ENV_FIELDS
from retrieval.endpoint import EndpointConfig


def test_readme_lists_every_setting():
    readme = (REPO / "README.md").read_text()
    for f in fields(IndexConfig):
        assert f"`RAGPIPE_{f.name.upper()}`" in readme, f.name
    retrieval = [f"RAGPIPE_{name.upper()}" for name in ENV_FIELDS]
    for name in ["RAGPIPE_DATABASE_URL", "RAGPIPE_HOME", *EndpointConfig.variables(), *retrieval]:
        assert f"`{name}`" in readme, name


def test_readme_lists_every_serve_setting():
    from service.config import Limits, ServeConfig

    readme = (REPO / "README.md").read_text()
    names = [f.name for f in fields(ServeConfig) if f.name not in ("limits", "registry")] + [f.name for f in fields(Limits)]
    for name in [*names, "tokens"]:
        assert f"`RAGPIPE_SERVE_{name.upper()}`" in readme, name


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()

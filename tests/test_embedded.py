"""With no database URL, the registry starts an embedded PostgreSQL under RAGPIPE_HOME: same schema, same code."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_tree

pytestmark = [pytest.mark.db, pytest.mark.slow]


def test_embedded_postgres_serves_the_cli(tmp_path):
    home = tmp_path / "h"  # short: the server's socket lives in here
    src = write_tree(tmp_path / "src", {"a.md": "# Title\n\nEmbedded registry test.\n"})
    env = {k: v for k, v in os.environ.items() if k != "RAGPIPE_DATABASE_URL"}
    env.update(RAGPIPE_HOME=str(home), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pipeline.cli"]
    up = subprocess.run(cmd + ["db", "upgrade"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "schema at version" in up.stdout
    run = subprocess.run(cmd + ["index", str(src), "--json"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["documents"]["new"] == 1 and summary["chunks"]["active"] == 1
    assert summary["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (home / "pgdata" / "PG_VERSION").is_file()
    again = subprocess.run(cmd + ["index", str(src), "--json"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert json.loads(again.stdout)["documents"]["unchanged"] == 1

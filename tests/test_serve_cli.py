"""`ragpipe serve` as users start it: a real process over a version indexed by `ragpipe index` with the
real model, serving every alias with no --index, stopping cleanly on SIGTERM; and a base install
asked to serve naming the extra to install."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_tree
from serving import call, free_port
from test_packaging import base_install_cli

pytestmark = [pytest.mark.db, pytest.mark.slow]


def env_for(database_url, home):  # type: ignore[no-untyped-def]
    return dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(home))


def test_serve_answers_searches_on_every_alias_and_stops_on_sigterm(tmp_path, database_url):
    pytest.importorskip("fastapi", reason="needs ragpipe[serve]")
    env = env_for(database_url, tmp_path / "home")
    src = write_tree(tmp_path / "src", {"wings.md": "# Wings\n\nWings generate lift from pressure differences.\n",
                                        "heat.md": "# Heat shields\n\nHeat shields protect capsules during reentry.\n"})
    for index in ("kb", "notes"):
        indexed = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(src), "--index", index], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
        assert indexed.returncode == 0, indexed.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while call(base, "/readyz")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.stdout else ""
            time.sleep(0.2)
        ready = call(base, "/readyz")[1]
        assert {i["index"] for i in ready["indexes"]} == {"kb", "notes"}
        status, body, _ = call(base, "/v1/search", {"query": "what protects a capsule during reentry?", "k": 2,
                                                    "index": "notes"})
        assert status == 200 and body["index"] == "notes" and body["hits"][0]["doc_id"] == "heat.md"
        status, body, _ = call(base, "/v1/search", {"query": "lift"})  # two aliases served: name one
        assert status == 422 and body["detail"][0]["loc"] == ["body", "index"] and "kb" in body["detail"][0]["msg"]
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so that the exit status says what stopped it
    assert server.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out


def test_a_base_install_asked_to_serve_says_which_extra_to_install(tmp_path, database_url):
    result = base_install_cli(["serve", "--port", str(free_port())], env_for(database_url, tmp_path / "home"))
    assert result.returncode == 1, result.stderr
    assert 'pip install "ragpipe[serve]"' in result.stderr and "Traceback" not in result.stderr

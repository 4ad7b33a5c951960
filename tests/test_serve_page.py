"""The search page at `/` in a real browser (Playwright driving the system's Chromium): a query shows
hits with the matching characters marked, their heading path, every stage's score and rank, and the
version that served them; the panel lists aliases, versions with status and validation metrics, and runs."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import write_tree
from pipeline.config import IndexConfig
from pipeline.runner import run_index
from serving import running

pytestmark = [pytest.mark.db, pytest.mark.slow]

service_app = pytest.importorskip("service.app", reason="needs ragpipe[serve]")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright ([test] extra)")
from service.config import ServeConfig  # noqa: E402

CHROMIUM = os.environ.get("RAGPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

ROLLBACK = """# Operations guide

## Rollback

An alias can be rolled back to the previous version instantly, without rebuilding anything.
"""
DELETES = """# Operations guide

## Deletes

When a document disappears from the source, its chunks are marked deleted and leave the next version.
"""


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.fail("no Chromium found: `apt-get install chromium` (or set RAGPIPE_CHROMIUM); .ci/run installs it")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()


def test_the_page_searches_and_shows_attribution_scores_and_versions(tmp_path, registry, registry_config, embedder,
                                                                     browser):
    src = write_tree(tmp_path / "src", {"rollback.md": ROLLBACK, "deletes.md": DELETES, "faq.txt": "Wings generate lift from pressure.\n"})
    summary = run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    app = service_app.create_app(ServeConfig(registry=registry_config), encoder=embedder)
    with running(app) as base:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        # the panel: the alias, its live version with status, role and validation metrics, the run
        alias = page.locator('section.alias[data-alias="docs"]')
        alias.wait_for(timeout=15000)
        assert summary.version in alias.locator("h3").inner_text()
        row = alias.locator("table.versions tr", has_text=summary.version)
        assert "published" in row.inner_text() and "live" in row.inner_text()
        assert "hnsw_recall_at_10=" in row.inner_text()
        assert "succeeded" in alias.locator("table.runs").inner_text()

        page.fill("#query", "documents deleted from the source")
        page.click("button[type=submit]")
        first = page.locator("li.hit").first
        first.wait_for(timeout=15000)
        assert page.locator("#served-version").inner_text() == summary.version
        assert first.locator('tr[data-stage="rerank"] td').all_inner_texts()[2] == "1"  # hits are in rerank order
        hit = page.locator("li.hit", has_text="disappears")
        assert "Operations guide › Deletes" in hit.locator(".heading").inner_text()
        marked = [m.lower() for m in hit.locator("mark").all_inner_texts()]
        assert {"document", "deleted", "source"} <= set(marked), marked
        text = hit.locator(".text").inner_text()
        assert "When a document disappears from the source" in text  # the hit's own text around the marks
        for stage in ("bm25", "vector", "fused", "rerank"):
            cells = hit.locator(f'tr[data-stage="{stage}"] td').all_inner_texts()
            assert cells[0] == stage and float(cells[1]) and int(cells[2]) >= 1, (stage, cells)
        assert hit.locator('tr[data-stage="bm25"] td').all_inner_texts()[2] == "1"  # the lexical best match
        assert summary.version in hit.locator(".version").inner_text()

        page.fill("#query", "x" * 5000)  # beyond the limit: the page shows the service's message
        page.click("button[type=submit]")
        page.locator("#status.error").wait_for(timeout=15000)
        status = page.locator("#status").inner_text()
        assert "422" in status and "RAGPIPE_SERVE_MAX_QUERY_CHARS" in status, status
        assert errors == []

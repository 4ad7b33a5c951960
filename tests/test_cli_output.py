"""What `ragpipe` prints for people, from typed results (pure: no database, no model)."""

from datetime import datetime, timedelta, timezone

from pipeline.cli_output import format_duration, format_hits, format_run, format_summary, format_table
from pipeline.runner import RunSummary
from registry.rows import RunListing
from retrieval.hit import Hit, StageScore


def test_run_summary_lists_what_the_run_did_and_caps_the_skipped_list():
    summary = RunSummary(
        run_id=7, index="kb", source="/src", status="succeeded", version="kb_1", model_id="m",
        documents={"seen": 60, "new": 2, "changed": 1, "unchanged": 3, "metadata_only": 0, "deleted": 1, "skipped": 53},
        chunks={"added": 4, "removed": 2, "kept": 9, "active": 11},
        embedding={"chunks_embedded": 3, "chunks_cached": 1, "chars_embedded": 120},
        stage_seconds={"discover": 0.01234, "embed": 1.5}, full_build=True, metrics={"hnsw_recall_at_10": 1.0},
        alias={"alias": "kb", "version": "kb_1", "previous": "kb_0", "action": "publish"},
        skipped=[{"doc_id": f"d{i}", "reason": "binary file (NUL bytes)"} for i in range(53)],
    )
    lines = format_summary(summary).splitlines()
    assert lines[:8] == [
        "run 7 on index 'kb': succeeded, version kb_1",
        "  documents  seen 60  new 2  changed 1  unchanged 3  metadata-only 0  deleted 1  skipped 53",
        "  chunks     added 4  removed 2  kept 9  active 11",
        "  embedding  3 embedded (120 chars), 1 from cache  [m]",
        "  seconds    discover 0.012  embed 1.500",
        "  alias      kb_1 is live on 'kb' (was kb_0)  [full build]",
        "  validated  hnsw_recall_at_10 1.0",
        "  skipped (53):",
    ]
    assert lines[8] == "    d0: binary file (NUL bytes)" and len(lines) == 8 + 50 + 1
    assert lines[-1] == "    ... and 3 more (--json lists all)"


def test_recorded_run_and_tables():
    started = datetime(2026, 11, 27, 2, 23, 12, tzinfo=timezone.utc)
    row = RunListing(run_id=3, index_name="docs", source="/src", owner="airflow:rag_index", status="failed",
                     started_at=started, finished_at=started + timedelta(seconds=2.25), counts={}, stage_seconds={},
                     error="boom")
    assert format_run(row) == "run 3 (airflow:rag_index) on index 'docs': failed, 2.2 s\n  error      boom"
    table = format_table([{"a": None, "b": {"x": 1, "y": 2}}, {"a": started, "b": "long value"}], ["a", "b"])
    assert table.splitlines() == ["a                    b         ",
                                  "-                    x=1 y=2   ",
                                  "2026-11-27 02:23:12  long value"]
    assert format_table([], ["alias", "version"]) == "alias  version"


def test_hits_show_every_stage_and_none_for_a_stage_that_missed():
    hit = Hit(doc_id="a.md", chunk_id="c", text="word " * 50, source_uri="file:///a.md", heading_path=("A", "B"),
              char_start=0, char_end=250, ordinal=0, chunk_hash="h", index_version="kb_1", alias="kb",
              version_updated_at=None, model_id="m", bm25=StageScore(), vector=StageScore(0.5, 1),
              fused=StageScore(0.03, 1), rerank=StageScore(0.9, 1), metadata={})
    assert format_hits([hit], "kb", "kb_1").splitlines() == [
        "1 hits from 'kb' version kb_1",
        " 1. 0.9000  a.md  [A > B]  chars 0-250",
        "    bm25 -  vector 0.5000 (#1)  fused 0.0300 (#1)  rerank 0.9000 (#1)",
        "    " + "word " * 32 + "...",  # the first 160 characters
        "    file:///a.md",
    ]


def test_durations_read_in_days_hours_or_seconds():
    assert [format_duration(s) for s in (30 * 86400, 36 * 3600, 5400, 90, 0)] == [
        "30 days", "1.5 days", "1.5 hours", "90 s", "0 s"]


def test_served_statistics_read_per_role():
    from pipeline.cli_output import format_served

    stats = {"canary": {"queries": 420, "compared": 40, "overlap@10": 0.9123, "p50_ms": 4.3, "p95_ms": 12.0},
             "live": {"queries": 3000, "compared": 0, "overlap@10": None, "p50_ms": 3.1, "p95_ms": 9.5}}
    assert format_served(stats) == "live 3000q p95 9.5ms; canary 420q overlap@10 0.91 p95 12ms"
    assert format_served({}) == ""

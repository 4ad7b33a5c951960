"""Replays: after every checked step the registry equals a fresh full build, and edits embed little."""

import json

import pytest

from pipeline.replay import run_replay
from registry import RegistryConfig

pytestmark = pytest.mark.db


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


SECTION = "\n\n".join(f"Paragraph {i} of the section explains the tunnel calibration in detail." for i in range(30))


def test_synthetic_replay_stays_exact(tmp_path, server_url, embedder):
    d = tmp_path / "replay"
    d.mkdir()
    base = [
        {"doc_id": "a.md", "text": f"# A\n\n{SECTION}\n\n## Tail\n\nEnd of A."},
        {"doc_id": "b.rst", "text": f"B\n=\n\n{SECTION}\n"},
        {"doc_id": "c.txt", "text": "Short note."},
    ]
    changes = [
        {"step": 1, "doc_id": "a.md", "op": "upsert", "text": base[0]["text"].replace("Paragraph 3 ", "Paragraph three ")},
        {"step": 2, "doc_id": "c.txt", "op": "delete"},
        {"step": 3, "doc_id": "d.md", "op": "upsert", "text": "# D\n\nA new document."},
        {"step": 3, "doc_id": "b.rst", "op": "upsert", "text": base[1]["text"] + "\nAppendix\n========\n\nMore."},
    ]
    write_jsonl(d / "base.jsonl", base)
    write_jsonl(d / "changes.jsonl", changes)
    result = run_replay(d, RegistryConfig(database_url=server_url, home=tmp_path), embedder, check_every=1)
    assert [c["step"] for c in result["checks"]] == [1, 2, 3]
    assert all(c["stale"] == 0 and c["missing"] == 0 for c in result["checks"])
    assert result["active_chunks_of_deleted_documents"] == 0
    assert result["documents_deleted"] == 1 and result["documents_upserted"] == 3
    # the edited paragraph re-embeds the chunks around it in a.md (not the document), plus d.md and the appendix
    assert 0 < result["chunks_embedded_replay"] <= 5
    assert result["noop_stage_seconds"].get("chunk") is None


@pytest.mark.slow
def test_peps_history_first_steps(tmp_path, server_url, embedder, shared_data):
    result = run_replay(shared_data / "peps-replay", RegistryConfig(database_url=server_url, home=tmp_path), embedder,
                        check_every=5, max_steps=10)
    assert result["base_documents"] == 720
    assert result["base_chunks"] <= 24_000  # content-defined cuts in long sections: 23,494 (packed full: 19,546)
    assert result["stale"] == 0 and result["missing"] == 0
    assert result["active_chunks_of_deleted_documents"] == 0

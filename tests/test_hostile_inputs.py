"""Hostile source input on a real PostgreSQL: every bad document is skipped with its reason, the run
succeeds and publishes the good ones, and the next run over the same input is not blocked by it.

The inputs live in tests/data/hostile/; what git cannot hold (FIFOs, unreadable directories, file
names that are not UTF-8) is made by the test.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_tree
from pipeline.chunking import CHARS_PER_TOKEN, chunk_document
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, SourceUnavailable
from pipeline.runner import run_index
from pipeline.sources import make_document
from registry import Registry, RegistryConfig

pytestmark = pytest.mark.db

HOSTILE = Path(__file__).resolve().parent / "data" / "hostile"
GOOD = "Gliders ride rising air over sunlit ridges."
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def index(source, registry, embedder, **kw):
    return run_index(str(source), registry, embedder, IndexConfig(lock_timeout=5, **kw))


def reasons(summary):
    return {s["doc_id"]: s["reason"] for s in summary.skipped}


def active_doc_ids(registry, index_name="docs"):
    return {r.doc_id for r in registry.active_chunks(index_name)}


def assert_skips_recorded_and_next_run_is_a_noop(source, registry, embedder, summary):
    """The run succeeded with its skips in runs.skipped; the same input again changes nothing."""
    assert summary.status == "succeeded" and summary.version is not None
    run = registry.get_run(summary.run_id)
    assert run.status == "succeeded" and run.skipped == summary.skipped
    again = index(source, registry, embedder)
    assert again.status == "succeeded" and again.version is None, again.to_dict()
    assert again.skipped == summary.skipped
    assert registry.get_run(again.run_id).status == "succeeded"


# -- characters PostgreSQL cannot store ----------------------------------------------------------

NUL_REASONS = {
    "nul-text": "line 2: text holds a NUL character at character 6, which PostgreSQL cannot store",
    "nul\\x00id": "line 3: doc_id holds a NUL character at character 3, which PostgreSQL cannot store",
    "nul-title": "line 4: metadata.title holds a NUL character at character 1, which PostgreSQL cannot store",
    "nul-key": "line 5: key 'a\\x00b' of metadata holds a NUL character at character 1, "
               "which PostgreSQL cannot store",
    "nul-value": "line 6: metadata.tags[1] holds a NUL character at character 1, which PostgreSQL cannot store",
}
SURROGATE_REASONS = {
    "surrogate-text": "line 2: text holds a lone surrogate (U+DC80) at character 6, which PostgreSQL cannot store",
    "surrogate\\udc80id": "line 3: doc_id holds a lone surrogate (U+DC80) at character 9, "
                          "which PostgreSQL cannot store",
    "surrogate-title": "line 4: metadata.title holds a lone surrogate (U+D800) at character 1, "
                       "which PostgreSQL cannot store",
    "surrogate-key": "line 5: key 'a\\udc80b' of metadata holds a lone surrogate (U+DC80) at character 1, "
                     "which PostgreSQL cannot store",
    "surrogate-value": "line 6: metadata.nested.tags[1] holds a lone surrogate (U+DFFF) at character 1, "
                       "which PostgreSQL cannot store",
}
NONFINITE_REASONS = {
    "nan-value": "line 2: metadata.score is nan, which PostgreSQL's JSON cannot store",
    "infinite-value": "line 3: metadata.scores[1] is inf, which PostgreSQL's JSON cannot store",
}


@pytest.mark.parametrize("name, expected", [("nul.jsonl", NUL_REASONS), ("surrogate.jsonl", SURROGATE_REASONS),
                                            ("nonfinite.jsonl", NONFINITE_REASONS)])
def test_jsonl_fields_postgres_cannot_store_are_skipped(tmp_path, registry, embedder, name, expected):
    source = tmp_path / name
    shutil.copy(HOSTILE / name, source)
    summary = index(source, registry, embedder)
    assert reasons(summary) == expected
    assert summary.documents["seen"] == 1 and active_doc_ids(registry) == {"good"}
    assert_skips_recorded_and_next_run_is_a_noop(source, registry, embedder, summary)


def test_nul_after_the_first_8_kib_of_a_file_is_skipped_and_keeps_the_indexed_version(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {"good.md": f"# Good\n\n{GOOD}\n", "late.txt": "fine text\n" * 1000})
    index(root, registry, embedder)
    before = {r.chunk_id for r in registry.active_chunks("docs") if r.doc_id == "late.txt"}
    late = "fine text\n" * 1000 + "then a NUL \x00 past the sniffed prefix\n"
    (root / "late.txt").write_text(late)
    write_tree(root, {"new-with-nul.txt": "x" * 9000 + "\x00"})
    summary = index(root, registry, embedder)
    assert reasons(summary) == {
        "late.txt": f"text holds a NUL character at character {late.index(chr(0))}, which PostgreSQL cannot store",
        "new-with-nul.txt": "text holds a NUL character at character 9000, which PostgreSQL cannot store",
    }
    assert summary.documents["kept_on_error"] == 1 and summary.documents["deleted"] == 0
    assert {r.chunk_id for r in registry.active_chunks("docs") if r.doc_id == "late.txt"} == before
    # nothing else changed, so this run built no version; the next one is a no-op all the same
    run = registry.get_run(summary.run_id)
    assert run.status == "succeeded" and run.skipped == summary.skipped
    again = index(root, registry, embedder)
    assert again.status == "succeeded" and again.version is None and again.skipped == summary.skipped


def test_file_name_that_is_not_utf8_is_skipped(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {"good.md": f"# Good\n\n{GOOD}\n"})
    with open(os.fsencode(root) + b"/caf\xe9.txt", "wb") as fh:  # a Latin-1 name: a lone surrogate in Python
        fh.write(b"text under a name that is not UTF-8\n")
    summary = index(root, registry, embedder)
    assert reasons(summary) == {
        "caf\\udce9.txt": "doc_id holds a lone surrogate (U+DCE9) at character 3, which PostgreSQL cannot store"}
    assert active_doc_ids(registry) == {"good.md"}
    assert_skips_recorded_and_next_run_is_a_noop(root, registry, embedder, summary)


def test_make_document_checks_every_field_before_anything_is_written():
    nested = {"a": [{"b": {"c\x00": 1}}]}
    skipped = make_document("d", "text", "uri", nested)
    assert skipped.reason == "key 'c\\x00' of metadata.a[0].b holds a NUL character at character 1, " \
                             "which PostgreSQL cannot store"
    assert make_document("d", "text", "uri", {"source_uri": "file:///x\udc80"}).reason.startswith(
        "metadata.source_uri holds a lone surrogate (U+DC80) at character 9")
    deep: dict = {}
    inner = deep
    for _ in range(200):
        inner["k"] = {}
        inner = inner["k"]
    assert make_document("d", "text", "uri", deep).reason == "metadata is nested deeper than 64 levels"
    assert make_document("d", "text \U0001f600 fine", "uri").text == "text \U0001f600 fine"  # astral: fine


def test_deeply_nested_jsonl_line_is_skipped(tmp_path, registry, embedder):
    source = tmp_path / "deep.jsonl"
    source.write_text(json.dumps({"doc_id": "good", "text": GOOD}) + "\n"
                      + '{"doc_id": "deep", "text": "t", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    summary = index(source, registry, embedder)
    assert reasons(summary) == {"deep.jsonl:2": "line 2: malformed JSON (nested too deeply)"}
    assert_skips_recorded_and_next_run_is_a_noop(source, registry, embedder, summary)


# -- files that cannot be read -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_home(tmp_path_factory):
    """One ragpipe home for the CLI runs of this module, so the model's ONNX export is made once."""
    return tmp_path_factory.mktemp("model-home")


def ragpipe(args, database_url, home, artifacts, *, no_dac=False, timeout=300):
    """The ``ragpipe`` command as a process; ``no_dac``: without the capabilities that let root read
    any file (so file modes apply to it as to any user)."""
    env = dict(os.environ, RAGPIPE_DATABASE_URL=database_url, HF_HUB_OFFLINE="1", RAGPIPE_HOME=str(home),
               RAGPIPE_ARTIFACTS=str(artifacts))
    command = [*(NO_DAC if no_dac else []), sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def ragpipe_index(source, database_url, home, artifacts, **kw):
    result = ragpipe(["index", str(source), "--json"], database_url, home, artifacts, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def active_chunks_by_doc(database_url):
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        out: dict[str, set[str]] = {}
        for r in reg.active_chunks("docs"):
            out.setdefault(r.doc_id, set()).add(r.chunk_id)
        return out


def run_row(database_url, run_id):
    with Registry.open(RegistryConfig(database_url=database_url), migrate=False) as reg:
        return reg.get_run(run_id)


@pytest.fixture
def locked(tmp_path):
    """chmod 000 paths for the test; modes are restored afterwards so the tree can be removed."""
    paths = []

    def lock(path):
        paths.append(path)
        path.chmod(0)

    yield lock
    for path in paths:
        path.chmod(0o755)


@pytest.mark.slow
def test_unreadable_subdirectory_keeps_all_its_documents(tmp_path, database_url, model_home, locked):
    root = write_tree(tmp_path / "src", {"a.md": f"# A\n\n{GOOD}\n", "sub/b.md": "# B\n\nBeta text.\n",
                                         "sub/deeper/c.md": "# C\n\nGamma text.\n"})
    art = tmp_path / "artifacts"
    first = ragpipe_index(root, database_url, model_home, art)
    assert first["status"] == "succeeded" and first["documents"]["new"] == 3
    before = active_chunks_by_doc(database_url)
    locked(root / "sub")

    second = ragpipe_index(root, database_url, model_home, art, no_dac=True)
    assert second["status"] == "succeeded", second
    assert {s["doc_id"]: s["reason"] for s in second["skipped"]} == {
        "sub/": "directory unreadable: Permission denied"}
    assert second["documents"]["deleted"] == 0 and second["documents"]["kept_on_error"] == 2
    assert active_chunks_by_doc(database_url) == before  # sub/b.md and sub/deeper/c.md are still served
    assert run_row(database_url, second["run_id"]).skipped == second["skipped"]

    third = ragpipe_index(root, database_url, model_home, art, no_dac=True)
    assert third["status"] == "succeeded" and third["version"] is None and third["skipped"] == second["skipped"]
    assert active_chunks_by_doc(database_url) == before


@pytest.mark.slow
def test_unreadable_file_keeps_its_chunks(tmp_path, database_url, model_home, locked):
    root = write_tree(tmp_path / "src", {"a.md": f"# A\n\n{GOOD}\n", "secret.md": "# S\n\nSecret text.\n"})
    art = tmp_path / "artifacts"
    ragpipe_index(root, database_url, model_home, art)
    before = active_chunks_by_doc(database_url)
    locked(root / "secret.md")
    write_tree(root, {"new.md": "# N\n\nA new document.\n"})

    second = ragpipe_index(root, database_url, model_home, art, no_dac=True)
    assert second["status"] == "succeeded" and second["version"] is not None
    assert {s["doc_id"]: s["reason"] for s in second["skipped"]} == {"secret.md": "unreadable: Permission denied"}
    assert second["documents"]["deleted"] == 0 and second["documents"]["kept_on_error"] == 1
    after = active_chunks_by_doc(database_url)
    assert after["secret.md"] == before["secret.md"] and set(after) == {"a.md", "secret.md", "new.md"}
    third = ragpipe_index(root, database_url, model_home, art, no_dac=True)
    assert third["status"] == "succeeded" and third["version"] is None


@pytest.mark.slow
def test_cli_skips_a_nul_doc_id_and_exits_0_on_every_run(tmp_path, database_url, model_home):
    source = tmp_path / "nul.jsonl"
    shutil.copy(HOSTILE / "nul.jsonl", source)
    art = tmp_path / "artifacts"
    first = ragpipe_index(source, database_url, model_home, art)
    assert first["status"] == "succeeded" and first["version"] is not None
    assert {s["doc_id"] for s in first["skipped"]} == set(NUL_REASONS)
    second = ragpipe_index(source, database_url, model_home, art)
    assert second["status"] == "succeeded" and second["version"] is None
    history = ragpipe(["runs", "list", "--json"], database_url, model_home, art)
    assert [r["status"] for r in json.loads(history.stdout)] == ["succeeded", "succeeded"]


@pytest.mark.slow
def test_fifo_as_jsonl_source_fails_at_once_and_releases_the_index(tmp_path, database_url, model_home):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    art = tmp_path / "artifacts"
    result = ragpipe(["index", str(fifo)], database_url, model_home, art, timeout=120)
    assert result.returncode == 1
    assert f"source {fifo} is not a regular file; nothing was changed" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"doc_id": "good", "text": GOOD}) + "\n")
    after = ragpipe(["index", str(good), "--lock-timeout", "0", "--json"], database_url, model_home, art)
    assert after.returncode == 0, after.stderr[-3000:]


def test_fifo_as_jsonl_source_raises_source_unavailable(tmp_path, registry, embedder):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    unblock = threading.Timer(10, _open_and_close_writer, [fifo])  # a reader blocked on the FIFO gets EOF
    unblock.start()
    try:
        with pytest.raises(SourceUnavailable, match="is not a regular file"):
            index(fifo, registry, embedder)
    finally:
        unblock.cancel()


def _open_and_close_writer(fifo):
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader: nothing is blocked on it


def test_fifo_and_dangling_symlink_in_a_directory_are_skipped_with_reasons(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", {"good.md": f"# Good\n\n{GOOD}\n", "target.md": "# T\n\nTarget text.\n"})
    os.symlink(root / "target.md", root / "link.md")
    os.mkfifo(root / "pipe.md")
    os.mkfifo(root / "pipe.bin")  # not a file the include globs want: left out without a word
    first = index(root, registry, embedder)
    assert reasons(first) == {"pipe.md": "not a regular file (a FIFO)"}
    (root / "target.md").unlink()  # link.md now dangles; its indexed version is kept
    second = index(root, registry, embedder)
    assert reasons(second) == {"link.md": "dangling symlink", "pipe.md": "not a regular file (a FIFO)"}
    assert second.documents["deleted"] == 1 and second.documents["kept_on_error"] == 1
    assert active_doc_ids(registry) == {"good.md", "link.md"}
    assert_skips_recorded_and_next_run_is_a_noop(root, registry, embedder, second)


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["index", "alias"])
def test_names_with_a_trailing_newline_are_refused(field):
    with pytest.raises(ConfigError, match="must match"):
        IndexConfig(**{field: "docs\n"})
    with pytest.raises(ConfigError, match="must match"):
        IndexConfig.from_env({f"RAGPIPE_{field.upper()}": "docs\n"})


# -- an unbroken 191 KB token --------------------------------------------------------------------


def _real_tokenizer():
    from tokenizers import Tokenizer

    from retrieval.models import DEFAULT_MODEL, resolve_model

    return Tokenizer.from_file(str(Path(resolve_model(DEFAULT_MODEL)[1]) / "tokenizer.json"))


def test_unbroken_191_kb_token_becomes_bounded_chunks_the_tokenizer_can_read(tmp_path, registry, embedder):
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(HOSTILE / "long-token.txt", root / "long-token.txt")
    blob = (root / "long-token.txt").read_text().strip()
    assert len(blob) == 191_000 and len(blob.split()) == 1
    summary = index(root, registry, embedder)
    assert summary.status == "succeeded"
    rows = sorted(registry.active_chunks("docs"), key=lambda r: r.ordinal)
    cap = CHARS_PER_TOKEN * embedder.max_tokens
    assert len(rows) > 10 and all(len(r.text) <= cap for r in rows)
    assert "".join(r.text for r in rows) == blob  # cut, never lost
    tokenizer = _real_tokenizer()
    unk = tokenizer.token_to_id("[UNK]")
    for r in rows:
        ids = tokenizer.encode(r.text, add_special_tokens=False).ids
        assert unk not in ids and 1 < len(ids) <= embedder.max_tokens, (len(r.text), len(ids))
    again = index(root, registry, embedder)
    assert again.version is None  # the same cut on the next run


@pytest.mark.slow
def test_unbroken_token_chunks_are_not_embedded_as_unk():
    from pipeline.embedding import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder(device="cpu")
    d = make_document("long-token.txt", (HOSTILE / "long-token.txt").read_text(), "uri")
    chunks = chunk_document(d, model.token_counter(), model.max_tokens)[:8]
    vectors = model.embed([c.indexed_text for c in chunks] + ["[UNK]"])
    similarity = vectors[:-1] @ vectors[-1]  # cosine with the vector of [CLS] [UNK] [SEP]
    assert similarity.max() < 0.9, similarity  # one unbroken chunk scored 1.0: it was that vector
    assert len(chunks) == 8
    assert len({tuple(np.round(v, 4)) for v in vectors[:-1]}) == 8  # different text, different vectors


def test_plan_keeps_every_document_under_a_directory_it_could_not_list():
    from pipeline.diff import plan_changes
    from registry.store import DocumentState

    known = {d: DocumentState(d, "h", "m", "v", "active", 1) for d in ("a.md", "sub/b.md", "sub/c/d.md", "subway.md")}
    plan = plan_changes(known, [], "v", unreadable_under=["sub/"])
    assert plan.kept == ("sub/b.md", "sub/c/d.md") and plan.deleted == ("a.md", "subway.md")
    assert plan_changes(known, [], "v", unreadable_under=[""]).deleted == ()  # the root: everything stays

"""Model identity and the model lock: hub models pinned to their commit, local models named by their
files' contents, the bundled default's fingerprint, and per-model query and passage prefixes."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from conftest import write_tree
from pipeline.config import IndexConfig
from pipeline.embedding import DEFAULT_MODEL, PrefixedEmbedder, make_embedder
from pipeline.errors import ModelLockError
from pipeline.runner import artifact_store, run_index
from pipeline.verify import verify_index
from retrieval.errors import ModelError, ModelMismatch
from retrieval.identity import BGE_EN_QUERY, BGE_ZH_QUERY, Prefixes, family_prefixes, fingerprint, resolve_prefixes
from retrieval.models import BUNDLED_FINGERPRINT, identify_model, model_id_of, resolve_model

DOCS = {
    "wings.md": "# Wings\n\nFlow separation over an airfoil at a high angle of attack causes a wing to stall.\n",
    "bread.md": "# Bread\n\nKnead the dough, let it rise, then bake the loaf in a hot oven.\n",
    "heat.md": "# Heat\n\nConvective heat transfer to a flat plate in hypersonic flow heats the shield.\n",
}
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from model_files import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def config_for(tmp_path, **kw):
    return IndexConfig(artifacts=str(tmp_path / "artifacts"), min_recall=0.0, lock_timeout=5, **kw)


def manifest_of(tmp_path, summary, index="docs"):
    return json.loads((tmp_path / "artifacts" / index / summary.version / "manifest.json").read_text())


# -- identity ------------------------------------------------------------------------------------

def test_a_local_model_id_hashes_its_files_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGPIPE_HOME", str(tmp_path / "home"))
    model = write_tree(tmp_path / "my-model", {"config.json": '{"hidden_size": 4}', "model.safetensors": b"\x01" * 64,
                                               "README.md": "about", ".cache/x": "y", "onnx/model.onnx": b"\x00"})
    first = identify_model(str(model))
    assert first.model_id == f"local:my-model@{first.fingerprint[:12]}" and first.path == str(model)
    (model / "README.md").write_text("other words")  # documentation, hidden files, other runtimes' exports:
    (model / "onnx" / "model.onnx").write_bytes(b"\x01")  # not what the model is loaded from
    assert identify_model(str(model)).model_id == first.model_id
    (model / "model.safetensors").write_bytes(b"\x02" * 64)  # same size, written right after hashing
    second = identify_model(str(model))
    assert second.model_id != first.model_id and model_id_of(str(model)) == second.model_id


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    model = write_tree(tmp_path / "m", {"config.json": "{}", "model.safetensors": b"\x01" * 4096})
    past = time.time() - 60
    for name in ("config.json", "model.safetensors"):
        os.utime(model / name, (past, past))
    cache = tmp_path / "fingerprints.json"
    digest = fingerprint(model, cache)
    entries = json.loads(cache.read_text())
    weights = entries[str((model / "model.safetensors").resolve())]
    assert weights[:2] == [4096, os.stat(model / "model.safetensors").st_mtime_ns] and len(weights[3]) == 64
    assert fingerprint(model, cache) == digest
    (model / "model.safetensors").write_bytes(b"\x02" * 4096)  # a new mtime: hashed again
    assert fingerprint(model, cache) != digest


def test_the_bundled_default_keeps_its_id_and_records_its_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGPIPE_HOME", str(tmp_path))
    bundled = identify_model(DEFAULT_MODEL)
    assert bundled.model_id == DEFAULT_MODEL == model_id_of("all-MiniLM-L6-v2")
    assert bundled.fingerprint == BUNDLED_FINGERPRINT
    assert identify_model(f"{DEFAULT_MODEL}@{BUNDLED_FINGERPRINT[:12]}").model_id == DEFAULT_MODEL
    with pytest.raises(ModelError, match="install the version that built the index"):
        identify_model(f"{DEFAULT_MODEL}@0123456789ab")
    # a package that ships other files under the same name gets an id of its own
    monkeypatch.setattr("retrieval.models.BUNDLED_FINGERPRINT", "0" * 64)
    assert identify_model(DEFAULT_MODEL).model_id == f"{DEFAULT_MODEL}@{BUNDLED_FINGERPRINT[:12]}"


def test_hub_names_resolve_to_their_cached_snapshots_commit(tmp_path, monkeypatch):
    from model_files import hub_snapshot

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = write_tree(tmp_path / "src", {"config.json": "{}", "model.safetensors": b"\x01" * 8})
    snapshot = hub_snapshot(tmp_path / "hub", "acme/embed", COMMIT_A, source)
    assert resolve_model("acme/embed") == (f"acme/embed@{COMMIT_A}", str(snapshot))
    assert model_id_of(f"acme/embed@{COMMIT_A}") == f"acme/embed@{COMMIT_A}"
    hub_snapshot(tmp_path / "hub", "acme/embed", COMMIT_B, source)  # a new commit on main
    assert model_id_of("acme/embed") == f"acme/embed@{COMMIT_B}"
    assert model_id_of(f"acme/embed@{COMMIT_A}") == f"acme/embed@{COMMIT_A}"  # the old one, pinned
    assert identify_model("acme/embed").fingerprint == fingerprint(source)
    assert model_id_of("acme/absent") == "acme/absent"  # named as given: nothing to pin it to here
    with pytest.raises(ModelError, match="'acme/absent' is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        resolve_model("acme/absent")


# -- prefixes ------------------------------------------------------------------------------------

def test_model_families_have_their_published_prefixes(tmp_path):
    e5 = Prefixes("query: ", "passage: ")
    assert family_prefixes("intfloat/e5-small-v2") == family_prefixes("intfloat/multilingual-e5-large") == e5
    assert family_prefixes(f"intfloat/e5-base-v2@{COMMIT_A}") == family_prefixes("/models/e5-large") == e5
    assert family_prefixes("intfloat/multilingual-e5-large-instruct") == Prefixes()  # wants a task instruction
    assert family_prefixes("BAAI/bge-small-en-v1.5") == Prefixes(BGE_EN_QUERY, "")
    assert family_prefixes("BAAI/bge-large-zh-v1.5") == Prefixes(BGE_ZH_QUERY, "")
    assert family_prefixes("BAAI/bge-m3") == family_prefixes(DEFAULT_MODEL) == Prefixes()
    assert resolve_prefixes("intfloat/e5-base", None, None, "none") == Prefixes("query: ", "")
    assert resolve_prefixes("intfloat/e5-base", None, "", None) == Prefixes("", "passage: ")
    assert resolve_prefixes("any", None, "Q: ", None) == Prefixes("Q: ", "")
    declared = write_tree(tmp_path / "nomic", {"config_sentence_transformers.json": json.dumps(
        {"prompts": {"query": "search_query: ", "document": "search_document: "}})})
    assert resolve_prefixes("e5-named", declared, None, None) == Prefixes("search_query: ", "search_document: ")


def test_prefixes_are_settings_and_flags():
    from pipeline.cli import _index_config, build_parser

    config = IndexConfig.from_env({"RAGPIPE_QUERY_PREFIX": "query: ", "RAGPIPE_PASSAGE_PREFIX": "none"})
    assert (config.query_prefix, config.passage_prefix) == ("query: ", "none")
    os.environ["RAGPIPE_PASSAGE_PREFIX"] = "doc: "
    try:
        args = build_parser().parse_args(["index", "src", "--query-prefix", "q: "])
        flagged = _index_config(args)
    finally:
        del os.environ["RAGPIPE_PASSAGE_PREFIX"]
    assert (flagged.query_prefix, flagged.passage_prefix) == ("q: ", "doc: ")
    assert IndexConfig().query_prefix is None  # unset: the model's default


class Recording:
    """The deterministic embedder, recording every text the model is given."""

    def __init__(self, inner):
        self.inner, self.model_id, self.dim, self.max_tokens = inner, inner.model_id, inner.dim, inner.max_tokens
        self.texts = []

    def token_counter(self):
        return self.inner.token_counter()

    def embed(self, texts):
        self.texts.extend(texts)
        return self.inner.embed(texts)


@pytest.mark.db
def test_prefixes_reach_the_model_and_a_changed_prefix_re_embeds_what_it_must(tmp_path, registry, embedder):
    root = write_tree(tmp_path / "src", DOCS)
    config = config_for(tmp_path)

    def run(query, passage):
        model = Recording(embedder)
        return model, run_index(str(root), registry, PrefixedEmbedder(model, Prefixes(query, passage)), config)

    model, first = run("query: ", "passage: ")
    assert len(model.texts) == first.embedding["chunks_embedded"] == 3
    assert sorted(model.texts) == sorted(f"passage: {text.strip()}" for text in DOCS.values()), model.texts
    model, same = run("query: ", "passage: ")
    assert same.version is None and model.texts == []
    model, other = run("query: ", "doc: ")  # another passage prefix: every text the model sees changed
    assert other.full_build and other.embedding["chunks_embedded"] == 3
    assert all(t.startswith("doc: ") for t in model.texts)
    model, back = run("query: ", "passage: ")  # the first prefix's vectors are still cached
    assert back.version and back.full_build and model.texts == []
    model, query_only = run("search: ", "passage: ")  # the documents' vectors stay; the version records it
    assert query_only.version and query_only.full_build and model.texts == []
    assert manifest_of(tmp_path, query_only)["model"]["query_prefix"] == "search: "
    assert manifest_of(tmp_path, query_only)["model"]["passage_prefix"] == "passage: "
    report = verify_index(registry, artifact_store(config, registry.home), "docs", "docs")
    assert report.ok, report.violations


@pytest.mark.db
@pytest.mark.slow
def test_an_e5_index_is_searched_with_its_query_prefix_by_a_fresh_retriever(
        tmp_path, tiny_model, registry, registry_config):
    from retrieval import Retriever
    from retrieval.onnx import OnnxEncoder

    model = shutil.copytree(tiny_model, tmp_path / "tiny-e5-small")  # an e5 by name: e5's prefixes
    e5 = make_embedder(str(model), device="cpu", cache_dir=registry_config.home / "cache")
    assert isinstance(e5, PrefixedEmbedder) and e5.prefixes == Prefixes("query: ", "passage: ")
    assert type(e5.inner).__name__ == "OnnxModelEncoder" and e5.max_tokens < e5.inner.max_tokens
    summary = run_index(str(write_tree(tmp_path / "src", DOCS)), registry, e5, config_for(tmp_path))
    assert summary.metrics["query_encoder_min_cosine"] >= 0.99999  # the stored encoder, fed "passage: " too
    recorded = manifest_of(tmp_path, summary)["model"]
    assert (recorded["query_prefix"], recorded["passage_prefix"]) == ("query: ", "passage: ")
    assert recorded["fingerprint"] == identify_model(str(model)).fingerprint
    bundle = tmp_path / "artifacts" / recorded["encoder"]["path"]
    spec = json.loads((bundle / "encoder.json").read_text())
    assert (spec["query_prefix"], spec["passage_prefix"]) == ("query: ", "passage: ")
    raw = OnnxEncoder(bundle)
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False) as retriever:
        version = retriever._current
        assert type(retriever._encoder(version)).__name__ == "OnnxEncoder"  # what a base install runs
        query = "why does a wing stall?"
        vector = retriever._embed([query], version)[0]
        np.testing.assert_allclose(vector, raw.embed([f"query: {query}"])[0], atol=1e-5)
        assert not np.allclose(vector, raw.embed([query])[0], atol=1e-3)
        key = next(k for k in version.row if version.columns["doc_id"][version.row[k]] == "wings.md")
        np.testing.assert_allclose(version.vectors([key])[0], raw.embed([f"passage: {DOCS['wings.md'].strip()}"])[0], atol=1e-5)
        assert retriever.search(query, k=3)
    manifest = tmp_path / "artifacts" / "docs" / summary.version / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model"]["query_prefix"] = "search: "  # a manifest whose stored encoder says otherwise
    manifest.write_text(json.dumps(data))
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False) as retriever:
        with pytest.raises(ModelMismatch, match="prefixes queries with 'search: '; its stored encoder says 'query: '"):
            retriever.search(query, k=3)


@pytest.mark.db
@pytest.mark.slow
def test_a_local_model_whose_weights_changed_fails_the_lock(tmp_path, tiny_model, registry, registry_config):
    from model_files import change_weights

    model = shutil.copytree(tiny_model, tmp_path / "my-model")
    root = write_tree(tmp_path / "src", DOCS)
    config = config_for(tmp_path)
    cache = registry_config.home / "cache"
    first = run_index(str(root), registry, make_embedder(str(model), device="cpu", cache_dir=cache), config)
    change_weights(model)  # same shapes, same file size: only the contents say it is another model
    second = run_index(str(root), registry, make_embedder(str(model), device="cpu", cache_dir=cache), config)
    assert second.version and second.model_id != first.model_id and second.full_build
    assert second.embedding["chunks_embedded"] == first.embedding["chunks_embedded"] == 3  # nothing reused
    assert manifest_of(tmp_path, second)["model"]["fingerprint"] != manifest_of(tmp_path, first)["model"]["fingerprint"]


@pytest.mark.db
@pytest.mark.slow
def test_a_hub_model_is_pinned_to_its_commit_and_a_rewritten_snapshot_is_refused(
        tmp_path, tiny_model, registry, registry_config, monkeypatch):
    from model_files import change_weights, hub_snapshot

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    root = write_tree(tmp_path / "src", DOCS)
    config = config_for(tmp_path)
    cache = registry_config.home / "cache"
    hub_snapshot(hub, "acme/tiny-embed", COMMIT_A, tiny_model)
    first = run_index(str(root), registry, make_embedder("acme/tiny-embed", device="cpu", cache_dir=cache), config)
    assert first.model_id == f"acme/tiny-embed@{COMMIT_A}"

    updated = shutil.copytree(tiny_model, tmp_path / "updated")
    change_weights(updated)
    snapshot_b = hub_snapshot(hub, "acme/tiny-embed", COMMIT_B, updated)  # the model was updated upstream
    second = run_index(str(root), registry, make_embedder("acme/tiny-embed", device="cpu", cache_dir=cache), config)
    assert second.model_id == f"acme/tiny-embed@{COMMIT_B}" and second.full_build
    assert second.embedding["chunks_embedded"] == 3

    before = identify_model("acme/tiny-embed").fingerprint
    change_weights(snapshot_b)  # the snapshot's files rewritten in place: same commit, other weights
    after = identify_model("acme/tiny-embed").fingerprint
    with pytest.raises(ModelLockError) as info:
        run_index(str(root), registry, make_embedder("acme/tiny-embed", device="cpu", cache_dir=cache), config)
    message = str(info.value)
    assert f"fingerprint {after[:12]}" in message and f"fingerprint {before[:12]}" in message
    assert second.version in message and "huggingface-cli download" in message
    assert registry.head_version("docs").version == second.version  # nothing built, the alias unchanged


@pytest.mark.slow
def test_a_models_declared_prompts_are_its_prefixes_and_applied_once(tmp_path, tiny_model):
    model = shutil.copytree(tiny_model, tmp_path / "declares-prompts")
    (model / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "search_query: ", "document": "search_document: "}, "default_prompt_name": "document"}))
    onnx = make_embedder(str(model), device="cpu", cache_dir=tmp_path / "cache")
    torch = make_embedder(f"{model}#torch", device="cpu")
    assert onnx.prefixes == torch.prefixes == Prefixes("search_query: ", "search_document: ")
    texts = ["lift over a wing", "bread in an oven"]
    # sentence-transformers would put its default prompt before ours as well: ragpipe asks it not to
    np.testing.assert_allclose(torch.embed(texts), onnx.embed(texts), atol=1e-5)
    np.testing.assert_allclose(torch.embed(texts), onnx.inner.embed([f"search_document: {t}" for t in texts]), atol=1e-5)
    np.testing.assert_allclose(torch.embed_queries(texts), onnx.inner.embed([f"search_query: {t}" for t in texts]),
                               atol=1e-5)

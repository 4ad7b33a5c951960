"""BM25 analysis and scoring as pure logic: the analyzer across threads, and the idf floor of tiny indexes."""

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_threads
from retrieval.bm25 import Analyzer, BM25Scorer, BM25Tables

WORDS = ("connections nationalization generously hopefulness relational conditional universities effective "
         "running flies dying agreed sensational traditionalism").split()


def _texts(n=400):
    # some thousand distinct words that stem ("bconnections" -> "bconnect"): the stemmer works, not its cache
    return [" ".join(f"{chr(97 + (i + j) % 26)}{WORDS[(i * j) % len(WORDS)]}" for j in range(25)) for i in range(n)]


def test_each_thread_stems_with_its_own_stemmer():
    # PyStemmer's Stemmer holds state between its calls into libstemmer and is documented as not
    # thread-safe; retrieval serves queries from many threads through one analyzer per version
    analyzer = Analyzer()
    stemmers, barrier = {}, threading.Barrier(4)

    def grab(n):
        barrier.wait()
        stemmers[n] = analyzer._stemmer
        assert analyzer._stemmer is stemmers[n]  # and keeps it

    assert run_threads(grab, [(n,) for n in range(4)]) == []
    assert len({id(s) for s in stemmers.values()}) == 4


def test_concurrent_analysis_equals_single_threaded():
    texts = _texts()
    expected = [Analyzer().terms(t) for t in texts]
    shared = Analyzer()
    wrong = []

    def work():
        for _ in range(5):
            wrong.extend(text for text, terms in zip(texts, expected) if shared.terms(text) != terms)

    assert run_threads(work, [()] * 8) == []
    assert wrong == []


def _scorer(texts):
    return BM25Scorer(BM25Tables.empty().update([], list(enumerate(texts)), Analyzer()))


def test_one_and_two_chunk_indexes_score_matching_chunks_positively():
    # rank-bm25's idf log((N - df + 0.5) / (df + 0.5)) is log(1/3) for N=1 and 0 for N=2, df=1, and
    # its floor (epsilon * mean idf) is not positive when no idf is
    one = _scorer(["Wings generate lift."])
    assert one.scores("lift")[0] > 0 and one.scores("wing lift")[0] > one.scores("lift")[0]
    assert one.scores("heat")[0] == 0  # a term not in the index scores nothing
    two = _scorer(["Wings generate lift.", "Heat shields and wings."])
    lift, wing = two.scores("lift"), two.scores("wings")
    assert lift[0] > 0 and lift[1] == 0
    assert wing[0] > 0 and wing[1] > 0
    keys, scores, _ = two.top("lift", 2)
    assert keys.tolist() == [0] and scores[0] > 0


WORDS_SMALL = ["wing", "lift", "drag", "heat", "flow", "mach", "shock", "plate"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS_SMALL), min_size=1, max_size=6), min_size=1, max_size=9))
def test_scores_equal_rank_bm25_wherever_its_idf_is_positive(docs):
    from rank_bm25 import BM25Okapi

    texts = [" ".join(d) for d in docs]
    analyzer = Analyzer()
    ours = _scorer(texts)
    reference = BM25Okapi([analyzer.terms(t) for t in texts])
    for term in set(analyzer.terms(" ".join(texts))):
        mine, theirs = ours.scores(term), reference.get_scores([term])
        if reference.idf[term] > 0:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        else:  # the floor: every chunk holding the term scores above zero, the others zero
            holds = np.array([term in analyzer.terms(t) for t in texts])
            assert (mine[holds] > 0).all() and (mine[~holds] == 0).all()

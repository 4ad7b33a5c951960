"""BM25 analysis and scoring as pure logic: the analyzer across threads, and the idf floor of tiny indexes."""

import threading

from conftest import run_threads
from retrieval.bm25 import Analyzer

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

"""BM25 analysis and scoring as pure logic: the analyzer across threads, and the idf floor of tiny indexes."""

import threading

from retrieval.bm25 import Analyzer

WORDS = ("connections nationalization generously hopefulness relational conditional universities effective "
         "running flies dying agreed sensational traditionalism").split()


def _texts(n=400):
    # many distinct words, so the stemmer's cache misses and is purged while threads share it
    return [" ".join(f"{WORDS[(i + j) % len(WORDS)]}{'s' * (j % 3)}x{i % 97}" for j in range(25)) for i in range(n)]


def test_each_thread_stems_with_its_own_stemmer():
    # PyStemmer's Stemmer holds state between its calls into libstemmer and is documented as not
    # thread-safe; retrieval serves queries from many threads through one analyzer per version
    analyzer = Analyzer()
    stemmers, barrier = {}, threading.Barrier(4)

    def grab(n):
        barrier.wait()
        stemmers[n] = analyzer._stemmer
        assert analyzer._stemmer is stemmers[n]  # and keeps it

    threads = [threading.Thread(target=grab, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in stemmers.values()}) == 4


def test_concurrent_analysis_equals_single_threaded():
    texts = _texts()
    expected = [Analyzer().terms(t) for t in texts]
    shared = Analyzer()
    wrong, errors = [], []

    def work():
        try:
            for _ in range(5):
                for text, terms in zip(texts, expected):
                    if shared.terms(text) != terms:
                        wrong.append(text)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []

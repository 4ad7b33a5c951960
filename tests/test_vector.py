"""The vector stage's guard of hnswlib's shared search breadth, on a real hnswlib index."""

import numpy as np

from conftest import run_threads
from retrieval.vector import EfGate


def test_searches_needing_different_ef_get_their_own_breadth():
    import hnswlib

    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    index = hnswlib.Index(space="l2", dim=32)
    index.init_index(max_elements=len(data), M=8, ef_construction=40, random_seed=1)
    index.add_items(data, np.arange(len(data)))
    gate = EfGate()
    efs = [1, 200]
    expected = {ef: gate.knn_query(index, queries, 5, ef)[0] for ef in efs}
    assert not np.array_equal(expected[1], expected[200])  # the breadth changes the answer
    wrong = []

    def worker(ef):
        for _ in range(60):
            for i in range(0, len(queries), 8):  # batches: hnswlib reads ef once per query
                labels = gate.knn_query(index, queries[i : i + 8], 5, ef)[0]
                if not np.array_equal(labels, expected[ef][i : i + 8]):
                    wrong.append(ef)

    assert run_threads(worker, [(efs[n % 2],) for n in range(6)]) == []
    assert wrong == []

"""The HNSW recall check against exact search: it must pass a sound index and catch a poor one."""

import hnswlib
import numpy as np

from pipeline.validation import hnsw_recall


def index_of(vectors, m, ef_construction):
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=m, ef_construction=ef_construction)
    keys = np.arange(1000, 1000 + len(vectors))
    index.add_items(vectors, keys)
    return index, keys


def unit(rows, dim, seed):
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_recall_separates_sound_from_poor_indexes():
    vectors = unit(3000, 32, 0)
    good, keys = index_of(vectors, 16, 200)
    assert hnsw_recall(good, keys, vectors, ef=200) >= 0.97
    poor, keys = index_of(vectors, 2, 4)
    assert hnsw_recall(poor, keys, vectors, ef=10) < 0.8


def test_duplicates_are_not_misses():
    vectors = np.repeat(unit(50, 16, 1), 20, axis=0)  # every vector twenty times: ties everywhere
    index, keys = index_of(vectors, 16, 100)
    assert hnsw_recall(index, keys, vectors, ef=100) == 1.0

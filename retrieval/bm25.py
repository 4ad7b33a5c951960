"""BM25 data of a version: the analyzer, per-chunk term statistics, and their incremental update.

A version stores, for every chunk, its term ids and term frequencies and its length in terms, plus
the vocabulary with document frequencies. An incremental version copies its parent's tables, drops
the removed chunks (subtracting their terms from the document frequencies) and appends the added
ones — cost proportional to the change plus one sequential copy, never a rebuild from all texts.
Term ids are stable across versions: new terms are appended to the vocabulary.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.artifacts import writing_file

ANALYZER_VERSION = "lower-alnum;stop-en-v1;snowball-english"
K1 = 1.5  # rank-bm25's BM25Okapi defaults
B = 0.75
POSTINGS_FILE = "bm25_postings.parquet"
VOCAB_FILE = "bm25_vocab.parquet"

# A small English stop list: function words only, so that content terms (even short ones) survive.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)
_TOKEN = re.compile(r"[a-z0-9]+")


class Analyzer:
    """Lowercase alphanumeric terms, stop words removed, Snowball English stemming (PyStemmer).

    Safe to share between threads: each thread stems with its own PyStemmer object, which keeps
    state between its calls into libstemmer and a word cache, and is documented as not thread-safe.
    """

    version = ANALYZER_VERSION

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _stemmer(self):  # type: ignore[no-untyped-def]
        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            import Stemmer

            stemmer = self._local.stemmer = Stemmer.Stemmer("english")
        return stemmer

    def terms(self, text: str) -> list[str]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in STOPWORDS]
        return self._stemmer.stemWords(words)


_POSTINGS_SCHEMA = pa.schema(
    [("chunk_key", pa.int64()), ("term_ids", pa.list_(pa.int32())), ("tfs", pa.list_(pa.int32())),
     ("length", pa.int32())]
)


@dataclass
class BM25Tables:
    """Per-chunk term statistics and the vocabulary with document frequencies."""

    postings: pa.Table  # chunk_key, term_ids, tfs, length
    terms: list[str]  # term id -> term
    df: np.ndarray  # term id -> number of chunks containing it

    @classmethod
    def empty(cls) -> "BM25Tables":
        return cls(_POSTINGS_SCHEMA.empty_table(), [], np.zeros(0, dtype=np.int64))

    @property
    def keys(self) -> np.ndarray:
        return self.postings.column("chunk_key").to_numpy()

    @property
    def avgdl(self) -> float:
        n = self.postings.num_rows
        return float(pc.sum(self.postings.column("length")).as_py() or 0) / n if n else 0.0

    def update(self, removed_keys: Sequence[int], added: Sequence[tuple[int, str]], analyzer: Analyzer) -> "BM25Tables":
        """Return new tables: these minus ``removed_keys`` plus ``added`` (chunk_key, text) pairs."""
        postings = self.postings
        df = self.df.copy()
        if len(removed_keys):
            gone = pc.is_in(postings.column("chunk_key"), value_set=pa.array(removed_keys, pa.int64()))
            dropped = postings.filter(gone)
            flat = pc.list_flatten(dropped.column("term_ids")).to_numpy()
            if len(flat):
                df -= np.bincount(flat, minlength=len(df)).astype(np.int64)
            postings = postings.filter(pc.invert(gone))
        terms = list(self.terms)
        term_id = {t: i for i, t in enumerate(terms)}
        keys: list[int] = []
        term_lists: list[list[int]] = []
        tf_lists: list[list[int]] = []
        lengths: list[int] = []
        for key, text in added:
            counts = Counter(analyzer.terms(text))
            ids = []
            for term in counts:
                tid = term_id.get(term)
                if tid is None:
                    tid = term_id[term] = len(terms)
                    terms.append(term)
                ids.append(tid)
            keys.append(key)
            term_lists.append(ids)
            tf_lists.append(list(counts.values()))
            lengths.append(sum(counts.values()))
        if len(terms) > len(df):
            df = np.concatenate([df, np.zeros(len(terms) - len(df), dtype=np.int64)])
        for ids in term_lists:
            df[ids] += 1
        if keys:
            new = pa.table(
                {"chunk_key": pa.array(keys, pa.int64()), "term_ids": pa.array(term_lists, pa.list_(pa.int32())),
                 "tfs": pa.array(tf_lists, pa.list_(pa.int32())), "length": pa.array(lengths, pa.int32())},
                schema=_POSTINGS_SCHEMA,
            )
            postings = pa.concat_tables([postings, new]).combine_chunks()
        return BM25Tables(postings, terms, df)

    def write(self, directory: Path) -> list[str]:
        with writing_file(directory / POSTINGS_FILE) as path:
            pq.write_table(self.postings, path, compression="snappy")
        vocab = pa.table({"term": pa.array(self.terms, pa.string()), "df": pa.array(self.df, pa.int64())})
        with writing_file(directory / VOCAB_FILE) as path:
            pq.write_table(vocab, path, compression="snappy")
        return [POSTINGS_FILE, VOCAB_FILE]

    @classmethod
    def read(cls, directory: Path) -> "BM25Tables":
        postings = pq.read_table(directory / POSTINGS_FILE, schema=_POSTINGS_SCHEMA)
        vocab = pq.read_table(directory / VOCAB_FILE)
        return cls(postings, vocab.column("term").to_pylist(), vocab.column("df").to_numpy().astype(np.int64))


EPSILON = 0.25  # rank-bm25's floor for negative idf: EPSILON * mean idf


def bm25_idf(df: np.ndarray, n: int) -> np.ndarray:
    """Inverse document frequencies of terms found in ``df`` of ``n`` chunks each: rank-bm25's
    ``BM25Okapi`` idf wherever that is positive, a positive floor where it is not.

    BM25Okapi's idf is ``log((n - df + 0.5) / (df + 0.5))``, with negative values (terms in more
    than half the chunks) replaced by ``EPSILON * mean idf``. That is 0 for a term in exactly half
    the chunks, and never positive in one- and two-chunk indexes (``log(1/3)`` for n=1, ``0`` and
    ``log(1/5)`` for n=2, so the mean is negative too): a matching chunk would score nothing.
    Where BM25Okapi's idf is zero or negative, the idf is ``EPSILON * the mean of the positive
    idfs``, or ``EPSILON`` when no idf is positive. Terms with ``df == 0`` (gone from every chunk)
    count for nothing and score nothing.
    """
    df = df.astype(np.float64)
    present = df > 0
    raw = np.log(n - df + 0.5) - np.log(df + 0.5)
    idf = raw.copy()
    mean_idf = float(raw[present].mean()) if present.any() else 0.0
    idf[present & (raw < 0)] = EPSILON * mean_idf  # BM25Okapi's own floor
    positive = present & (raw > 0)
    floor = EPSILON * (float(raw[positive].mean()) if positive.any() else 1.0)
    idf[present & (idf <= 0)] = floor
    return idf


class BM25Scorer:
    """Serves BM25 queries over a version's tables: an inverted index built once at load.

    Scores are those of rank-bm25's ``BM25Okapi`` (same idf with its epsilon floor, same k1, b and
    length normalization, repeated query terms counted again) wherever BM25Okapi's idf is
    positive, computed with numpy over posting lists instead of a Python loop over every chunk;
    where it is not, :func:`bm25_idf` floors it so that a matching term always counts.
    """

    def __init__(self, tables: BM25Tables, analyzer: Analyzer | None = None, k1: float = K1, b: float = B) -> None:
        self.analyzer = analyzer or Analyzer()
        postings = tables.postings
        self.keys = postings.column("chunk_key").to_numpy()
        self.size = len(self.keys)
        lengths = postings.column("length").to_numpy().astype(np.float32)
        avgdl = float(lengths.mean()) if self.size else 1.0
        term_lists = postings.column("term_ids")
        flat_terms = pc.list_flatten(term_lists).to_numpy().astype(np.int64)
        flat_tfs = pc.list_flatten(postings.column("tfs")).to_numpy().astype(np.float32)
        counts = pc.list_value_length(term_lists).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = np.repeat(np.arange(self.size, dtype=np.int64), counts)
        order = np.argsort(flat_terms, kind="stable")
        self._rows = rows[order]
        tf = flat_tfs[order]
        norm = k1 * (1.0 - b + b * lengths[self._rows] / avgdl)
        self._weights = (tf * (k1 + 1.0) / (tf + norm)).astype(np.float32)
        vocab = len(tables.terms)
        self._offsets = np.zeros(vocab + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat_terms, minlength=vocab), out=self._offsets[1:])
        self._idf = bm25_idf(tables.df, self.size).astype(np.float32)
        self._term_id = {t: i for i, t in enumerate(tables.terms)}

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk (row order of the tables) for ``query``."""
        out = np.zeros(self.size, dtype=np.float32)
        for term in self.analyzer.terms(query):
            tid = self._term_id.get(term)
            if tid is None:
                continue
            start, end = self._offsets[tid], self._offsets[tid + 1]
            out[self._rows[start:end]] += self._idf[tid] * self._weights[start:end]
        return out

    def top(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk keys, scores, all scores) of the ``n`` best chunks with a positive score."""
        scores = self.scores(query)
        n = min(n, self.size)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), scores
        best = np.argpartition(-scores, n - 1)[:n]
        best = best[np.argsort(-scores[best], kind="stable")]
        best = best[scores[best] > 0]
        return self.keys[best], scores[best], scores

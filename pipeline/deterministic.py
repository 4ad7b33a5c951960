"""The deterministic embedder for counting runs, replays and tests: fast, reproducible, a weak retriever by design.

It tokenizes like the default model (so chunk boundaries match a real run) and embeds by feature
hashing: every lowercase word that is not a stop word adds +1 or -1 to one of ``dim`` coordinates
chosen by its CRC-32, and the sum is L2-normalized. Texts that share words are near each other, so vector indexes see data
with real neighbourhoods (random vectors would be an unrealistic worst case for HNSW), and identical
texts get identical vectors. It is never a default: nothing in the product reaches it unless asked
(``ragpipe replay --embedder deterministic``, the benchmarks, the test suite), and its model id
(``deterministic-hashing-DIM``) keeps its vectors apart from every real model's in the cache.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.chunking import TokenCounter
from pipeline.embedding import DEFAULT_MODEL, SentenceTransformerEmbedder, split_variant
from retrieval.bm25 import STOPWORDS

if TYPE_CHECKING:
    import pyarrow as pa


_WORD = re.compile(r"\w+")


class DeterministicEmbedder:
    """Feature-hashed bag-of-words vectors; ``texts_embedded`` counts the work asked of it."""

    def __init__(self, dim: int = 384, tokenizer_model: str = DEFAULT_MODEL) -> None:
        self.model_id = f"deterministic-hashing-{dim}"
        self.dim = dim
        self._tokenizer_source = SentenceTransformerEmbedder(split_variant(tokenizer_model)[0])  # tokenizer only
        self.max_tokens = self._tokenizer_source.max_tokens
        self.texts_embedded = 0

    def token_counter(self) -> TokenCounter:
        return self._tokenizer_source.token_counter()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                if word in STOPWORDS:
                    continue
                h = zlib.crc32(word.encode("utf-8"))
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
            norm = float(np.linalg.norm(out[i]))
            if norm == 0.0:  # no words: a fixed pseudo-random direction from the text's hash
                seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
                out[i] = np.random.default_rng(seed).standard_normal(self.dim)
                norm = float(np.linalg.norm(out[i]))
            out[i] /= norm
        self.texts_embedded += len(texts)
        return out


# -- synthetic corpora for the mechanics of segments at scale ----------------------------------------

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def synthetic_word(rank: int) -> str:
    """The vocabulary's word of ``rank``: distinct pronounceable letters, two syllables or more."""
    out, n = [], rank + len(_SYLLABLES)
    while n:
        n, digit = divmod(n, len(_SYLLABLES))
        out.append(_SYLLABLES[digit])
    return "".join(out)


def synthetic_texts(start: int, count: int, *, vocabulary: int = 30000, words: tuple[int, int] = (30, 90),
                    seed: int = 20261203) -> list[str]:
    """Texts ``start`` .. ``start + count - 1`` of an endless synthetic corpus: each a run of words
    drawn with Zipf-like frequencies (word of rank r with weight 1 / (r + 2)), so that BM25 sees
    common and rare terms as in prose. Text i depends only on ``i`` and ``seed``."""
    weights = 1.0 / (np.arange(vocabulary) + 2.0)
    cumulative = np.cumsum(weights / weights.sum())
    lexicon = [synthetic_word(r) for r in range(vocabulary)]
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        ranks = np.searchsorted(cumulative, rng.random(int(rng.integers(words[0], words[1] + 1))))
        out.append(" ".join(lexicon[min(r, vocabulary - 1)] for r in ranks.tolist()))
    return out


def synthetic_chunk_table(keys: Sequence[int], texts: Sequence[str], *, docs_of: int = 10) -> "pa.Table":
    """A chunk table (``retrieval.artifacts.CHUNK_SCHEMA``) of ``texts`` under chunk ``keys``, every
    ``docs_of`` consecutive keys one document's chunks."""
    import pyarrow as pa

    from retrieval.artifacts import CHUNK_SCHEMA

    n = len(keys)
    doc = [f"doc-{k // docs_of}" for k in keys]
    lengths = [len(t) for t in texts]
    return pa.table({
        "chunk_key": list(keys), "chunk_id": [f"{d}#{k % docs_of}" for d, k in zip(doc, keys)], "doc_id": doc,
        "chunk_hash": [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts],
        "ordinal": [k % docs_of for k in keys], "heading_path": [[] for _ in range(n)],
        "char_start": [0] * n, "char_end": lengths, "token_count": [len(t.split()) for t in texts],
        "text": list(texts), "source_uri": [f"synthetic://{d}" for d in doc], "metadata": ["{}"] * n,
        "valid_from": [None] * n, "context": [""] * n, "page_start": [None] * n, "page_end": [None] * n,
        "page_label_start": [None] * n, "page_label_end": [None] * n,
    }, schema=CHUNK_SCHEMA)

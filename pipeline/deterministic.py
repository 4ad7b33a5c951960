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

import numpy as np

from pipeline.chunking import TokenCounter
from pipeline.embedding import DEFAULT_MODEL, SentenceTransformerEmbedder, split_variant
from retrieval.bm25 import STOPWORDS


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

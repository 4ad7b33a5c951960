"""A deterministic embedder for counting runs: fast, reproducible, and meaningless as a retriever.

It tokenizes like the default model (so chunk boundaries match a real run) but derives each vector
from the SHA-256 of the text. It lives here, outside the product, and is chosen only explicitly
(``ragpipe replay --embedder deterministic``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pipeline.chunking import TokenCounter
from pipeline.embedding import DEFAULT_MODEL, SentenceTransformerEmbedder


class DeterministicEmbedder:
    """Vectors from text hashes; ``calls`` and ``texts_embedded`` count the work asked of it."""

    def __init__(self, dim: int = 384, tokenizer_model: str = DEFAULT_MODEL) -> None:
        self.model_id = f"deterministic-sha256-{dim}"
        self.dim = dim
        self._tokenizer_source = SentenceTransformerEmbedder(tokenizer_model)
        self.max_tokens = self._tokenizer_source.max_tokens
        self.texts_embedded = 0

    def token_counter(self) -> TokenCounter:
        return self._tokenizer_source.token_counter()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
            vec = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = vec / np.linalg.norm(vec)
        self.texts_embedded += len(texts)
        return out

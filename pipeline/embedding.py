"""Embedding stage: turn chunk texts into normalized vectors, serving repeats from the registry's cache.

The models themselves live in :mod:`retrieval.models` (queries are encoded with the same code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.chunking import TokenCounter
from retrieval.models import (
    DEFAULT_MODEL,
    HFTokenCounter,
    SentenceTransformerEmbedder,
    check_vectors,
    resolve_model,
    split_variant,
)

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "HFTokenCounter",
    "SentenceTransformerEmbedder",
    "check_vectors",
    "embed_in_batches",
    "make_embedder",
    "resolve_model",
]


class Embedder(Protocol):
    """What the pipeline needs from an embedding model."""

    model_id: str
    dim: int
    max_tokens: int  # the most content tokens one input may hold

    def token_counter(self) -> TokenCounter: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def make_embedder(model: str, *, device: str = "auto", batch_size: int = 32, cache_dir: Path | None = None) -> Embedder:
    """The document embedder for ``model``: sentence-transformers on torch, or ONNX Runtime for
    ``MODEL#onnx`` (the same vectors and model id) and ``MODEL#onnx-int8`` (quantized, its own id).

    ONNX exports are cached under ``cache_dir`` (default: ``RAGPIPE_HOME/cache``).
    """
    if not split_variant(model)[1]:
        return SentenceTransformerEmbedder(model, device=device, batch_size=batch_size)
    from registry import RegistryConfig
    from retrieval.onnx import OnnxEncoder

    cache = cache_dir or RegistryConfig.from_env().home / "cache"
    return OnnxEncoder(model, cache, batch_size=batch_size)


def embed_in_batches(
    embedder: Embedder,
    items: Sequence[tuple[str, str]],
    store: Callable[[list[str], np.ndarray], None],
    *,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Embed (chunk_hash, text) pairs batch by batch, handing each batch to ``store`` before the next.

    Storing every batch as soon as it exists is what lets a crashed run resume without re-embedding.

    Returns:
        The number of characters embedded.
    """
    chars = 0
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        texts = [text for _, text in batch]
        vectors = embedder.embed(texts)
        store([h for h, _ in batch], vectors)
        chars += sum(len(t) for t in texts)
        if on_batch:
            on_batch(len(batch))
    return chars

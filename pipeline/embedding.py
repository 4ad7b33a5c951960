"""Embedding stage: turn chunk texts into normalized vectors, serving repeats from the registry's cache.

The models themselves live in :mod:`retrieval.models` (queries are encoded with the same code).
"""

from __future__ import annotations

import logging
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
from retrieval.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "HFTokenCounter",
    "SentenceTransformerEmbedder",
    "check_vectors",
    "embed_in_batches",
    "make_embedder",
    "resolve_model",
    "split_variant",
]


class Embedder(Protocol):
    """What the pipeline needs from an embedding model."""

    model_id: str
    dim: int
    max_tokens: int  # the most content tokens one input may hold

    def token_counter(self) -> TokenCounter: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def make_embedder(model: str, *, device: str = "auto", batch_size: int = 32, cache_dir: Path | None = None) -> Embedder:
    """The document embedder for ``model``, by its runtime variant (see ``split_variant``).

    ``MODEL`` alone runs on ONNX Runtime when the device is the CPU and the model's modules run
    there (transformer, mean or CLS pooling, normalization): the same vectors as sentence-transformers
    under the same model id, at 0.94–1.15x its throughput on the reference CPU (docs/benchmarks.md,
    depending on the shared CPU's load); else, and for
    ``MODEL#torch``, on sentence-transformers. ``MODEL#onnx`` insists on ONNX Runtime;
    ``MODEL#onnx-int8`` runs the quantized export under its own model id. ONNX exports are cached
    under ``cache_dir`` (default: ``RAGPIPE_HOME/cache``) and made on first use.
    """
    base, variant = split_variant(model)
    if variant == "torch" or (not variant and not _on_cpu(device)):
        return SentenceTransformerEmbedder(base, device=device, batch_size=batch_size)
    from pipeline.encoders import OnnxModelEncoder
    from registry import RegistryConfig

    cache = cache_dir or RegistryConfig.from_env().home / "cache"
    if variant:
        return OnnxModelEncoder(model, cache, batch_size=batch_size)
    try:
        return OnnxModelEncoder(base, cache, batch_size=batch_size)
    except ModelError as exc:  # a model ONNX Runtime cannot run as is (another pooling, a Dense layer)
        logger.info("embedding documents with sentence-transformers: %s", exc)
        return SentenceTransformerEmbedder(base, device=device, batch_size=batch_size)


def _on_cpu(device: str) -> bool:
    """Whether ``device`` means the CPU; without an NVIDIA device node, 'auto' does so without
    importing torch (a planning step only counts tokens and should not pay for that import)."""
    if device == "auto" and not any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    from retrieval.models import resolve_device

    return resolve_device(device) == "cpu"


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

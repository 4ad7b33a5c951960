"""Embedding stage: turn chunk texts into normalized vectors, serving repeats from the registry's cache.

The models themselves live in :mod:`retrieval.models` and :mod:`retrieval.endpoint` (queries are
encoded with the same code); what identifies a model's weights and prefixes in
:mod:`retrieval.identity`. Here: choosing the embedder, applying the model's passage prefix, and
what a version records of its model (the model lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.chunking import TokenCounter
from pipeline.errors import ModelLockError
from retrieval.endpoint import EndpointConfig, EndpointEmbedder, is_endpoint_model
from retrieval.identity import Prefixes, resolve_prefixes
from retrieval.models import (
    DEFAULT_MODEL,
    HFTokenCounter,
    SentenceTransformerEmbedder,
    check_vectors,
    identify_model,
    resolve_model,
    split_variant,
)
from retrieval.errors import ModelError

if TYPE_CHECKING:
    from pipeline.config import IndexConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "HFTokenCounter",
    "PrefixedEmbedder",
    "SentenceTransformerEmbedder",
    "check_vectors",
    "embed_in_batches",
    "embedder_for",
    "make_embedder",
    "model_lock_matches",
    "model_record",
    "prefixes_of",
    "query_embedding",
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


def make_embedder(model: str, *, device: str = "auto", batch_size: int = 32, cache_dir: Path | None = None,
                  query_prefix: str | None = None, passage_prefix: str | None = None) -> Embedder:
    """The document embedder for ``model``, with the model's prefixes (see ``resolve_prefixes``:
    None takes the model's default, ``"none"`` or ``""`` none at all).

    ``openai:NAME`` embeds through an OpenAI-compatible endpoint (``retrieval.endpoint``); other
    models run locally (see ``local_embedder``).
    """
    if is_endpoint_model(model):
        inner: Embedder = EndpointEmbedder(model, EndpointConfig.from_env(), batch_size=batch_size)
        directory = None
    else:
        inner = local_embedder(model, device=device, batch_size=batch_size, cache_dir=cache_dir)
        directory = Path(identify_model(split_variant(model)[0]).path)
    prefixes = resolve_prefixes(split_variant(model)[0], directory if directory and directory.is_dir() else None,
                                query_prefix, passage_prefix)
    return PrefixedEmbedder(inner, prefixes) if prefixes else inner


def embedder_for(config: "IndexConfig") -> Embedder:
    """The document embedder an index's configuration names (model, device, batch size, prefixes)."""
    return make_embedder(config.model, device=config.device, batch_size=config.batch_size,
                         query_prefix=config.query_prefix, passage_prefix=config.passage_prefix)


class PrefixedEmbedder:
    """An embedder whose model sees every passage after the passage prefix (and, through
    ``embed_queries``, every query after the query prefix). The prefix takes part of the model's
    window, so chunks get that much less."""

    def __init__(self, inner: Embedder, prefixes: Prefixes) -> None:
        self.inner = inner
        self.prefixes = prefixes
        self.model_id = inner.model_id

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.inner.dim

    @cached_property
    def max_tokens(self) -> int:  # type: ignore[override]
        used = self.inner.token_counter().count([self.prefixes.passage])[0] if self.prefixes.passage else 0
        return self.inner.max_tokens - used

    @property
    def fingerprint(self) -> str | None:
        return getattr(self.inner, "fingerprint", None)

    def token_counter(self) -> TokenCounter:
        return self.inner.token_counter()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed([self.prefixes.passage + t for t in texts])

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed([self.prefixes.query + t for t in texts])


def prefixes_of(embedder: Embedder) -> Prefixes:
    return getattr(embedder, "prefixes", Prefixes())


def query_embedding(embedder: Embedder) -> Callable[[Sequence[str]], np.ndarray]:
    """How ``embedder`` embeds queries (with the query prefix where it has one)."""
    return getattr(embedder, "embed_queries", embedder.embed)


def model_record(embedder: Embedder) -> dict[str, Any]:
    """What a version's manifest records of its model besides id, dimension and encoder (all of it
    part of the model lock): the prefixes, the fingerprint of the model's files, the endpoint."""
    inner = getattr(embedder, "inner", embedder)
    prefixes = prefixes_of(embedder)
    # empty prefixes are left out: the manifests of models without them stay as they were
    record: dict[str, Any] = {k: v for k, v in (("query_prefix", prefixes.query),
                                                ("passage_prefix", prefixes.passage)) if v}
    files = getattr(inner, "fingerprint", None)
    if files:
        record["fingerprint"] = files
    if isinstance(inner, EndpointEmbedder):
        record["endpoint"] = inner.describe()
    return record


def model_lock_matches(manifest: dict[str, Any] | None, embedder: Embedder, version: str) -> bool:
    """Whether ``version`` (its ``manifest``) was built under ``embedder``'s model lock: the same
    model id, prefixes and files, so that it may be extended and its cached vectors reused.

    Raises:
        ModelLockError: the same model id with other files (a hub snapshot rewritten in place): the
            embedding cache holds the other files' vectors under that id.
    """
    model = (manifest or {}).get("model") or {}
    if model.get("id") != embedder.model_id:
        return False
    recorded, current = model.get("fingerprint"), getattr(embedder, "fingerprint", None)
    if recorded and current and recorded != current:
        raise ModelLockError(
            f"model {embedder.model_id!r}: its files have fingerprint {current[:12]}, but version {version} was "
            f"built from files with fingerprint {recorded[:12]} under the same id, and the embedding cache holds "
            "their vectors; restore those files (a hub model: `huggingface-cli download REPO --revision COMMIT "
            "--force-download`) or set RAGPIPE_MODEL to the model's directory, which gets an id of its own files")
    record = model_record(embedder)
    return all(model.get(key, "") == record.get(key, "") for key in ("query_prefix", "passage_prefix"))


def local_embedder(model: str, *, device: str = "auto", batch_size: int = 32, cache_dir: Path | None = None) -> Embedder:
    """The document embedder for a local ``model``, by its runtime variant (see ``split_variant``).

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

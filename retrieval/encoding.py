"""Encoding queries: the encoder each version needs (the caller's, the version's stored one, or
sentence-transformers), behind the exact query-vector cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval import telemetry
from retrieval.artifacts import store_root
from retrieval.errors import ModelError, ModelMismatch

if TYPE_CHECKING:
    from pathlib import Path

    from retrieval.caches import LRUCache
    from retrieval.config import RetrievalConfig
    from retrieval.loaded import LoadedVersion

logger = logging.getLogger("retrieval.retriever")


class QueryEncoding:
    """Query encoders and the query-vector cache; mixed into :class:`retrieval.retriever.Retriever`."""

    config: RetrievalConfig
    _given: dict[str, Any]
    _encoders: dict[tuple[str, str | None], Any]
    _encoder_lock: threading.Lock
    _query_cache: LRUCache
    _cache_dir: Path

    def _encoder(self, version: LoadedVersion) -> Any:
        """The query encoder of ``version``: the caller's for its model, else the one its manifest
        names (loaded once per digest), else sentence-transformers (``[pipeline]``)."""
        model_id = version.info.model_id
        ref = version.encoder_ref
        with self._encoder_lock:
            given = self._given.get(model_id)
            if given is not None:
                return given
            key = (model_id, ref.digest if ref is not None else None)
            encoder = self._encoders.get(key)
            if encoder is None:
                encoder = self._new_encoder(version)
                if encoder.model_id != model_id:
                    raise ModelMismatch(f"the version was embedded with {model_id!r}; the encoder is {encoder.model_id!r}")
                if getattr(encoder, "query_prefix", version.query_prefix) != version.query_prefix:
                    raise ModelMismatch(f"version {version.info.version} prefixes queries with {version.query_prefix!r}; "
                                        f"its stored encoder says {encoder.query_prefix!r}")
                self._encoders[key] = encoder
            return encoder

    def _new_encoder(self, version: LoadedVersion) -> Any:
        from retrieval.models import SentenceTransformerEmbedder, split_variant

        model_id, ref = version.info.model_id, version.encoder_ref
        endpoint = version.manifest["model"].get("endpoint")
        if endpoint is not None:  # queries go to the model the documents went to, over HTTP
            from retrieval.endpoint import endpoint_encoder

            return endpoint_encoder(endpoint, dim=version.dim)
        onnx_only = bool(split_variant(model_id)[1])  # a quantized model's vectors come from ONNX Runtime alone
        backend = self.config.encoder_backend
        if backend == "torch":
            if onnx_only:
                raise ModelError(f"{model_id!r} runs on ONNX Runtime only; use encoder_backend 'auto' or 'onnx'")
            return SentenceTransformerEmbedder(self.config.model or model_id, device=self.config.device)
        if ref is not None:
            from retrieval.onnx import OnnxEncoder

            return OnnxEncoder.from_store(store_root(version.info.artifact_uri), ref, model_id, self._cache_dir)
        if backend == "onnx" or onnx_only:
            raise ModelError(
                f"version {version.info.version} stores no ONNX query encoder for {model_id!r} (built before "
                "ragpipe 0.2, or by an embedder without one): rebuild it with `ragpipe index SOURCE --full`, "
                "or open the retriever with encoder=..."
            )
        logger.info("version %s stores no query encoder; encoding queries with sentence-transformers",
                    version.info.version)
        return SentenceTransformerEmbedder(self.config.model or model_id, device=self.config.device)

    def _embed(self, queries: Sequence[str], version: LoadedVersion) -> np.ndarray:
        model_id = version.info.model_id
        queries = [version.query_prefix + q for q in queries]  # what the model expects before a query
        with telemetry.span("embedding.query", {"embedding.model": model_id, "embedding.queries": len(queries)}):
            out: list[np.ndarray | None] = [self._query_cache.get((model_id, q)) for q in queries]
            missing = [i for i, v in enumerate(out) if v is None]
            if missing:
                vectors = self._encoder(version).embed([queries[i] for i in missing])
                for i, vec in zip(missing, vectors):
                    out[i] = vec
                    self._query_cache.put((model_id, queries[i]), vec)
            return np.stack(out) if out else np.zeros((0, 1), dtype=np.float32)  # type: ignore[arg-type]


__all__ = ["QueryEncoding"]

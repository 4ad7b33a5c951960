"""The Retriever: hybrid BM25 + HNSW search over the version an alias serves, with attribution.

query ─► embed (cached) ─► HNSW top-N ─┐
      ─► analyze ─► BM25 top-N ────────┴─► fuse ─► rerank ─► filter ─► top-k Hits

The retriever follows its alias: a background thread listens for the registry's ``ragpipe_alias``
notifications (and polls as a fallback), loads a newly published version beside the current one and
switches to it with one reference assignment. A query holds the version it started with until it
returns, so every result list comes from exactly one version.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from registry import Registry, RegistryConfig
from registry.listener import AliasListener
from retrieval import telemetry
from retrieval.batch import BatchResult, Query
from retrieval.errors import AliasNotFound, ModelError, ModelMismatch, VersionCorrupt, VersionUnavailable
from retrieval.fusion import reciprocal_rank_fusion, weighted_fusion
from retrieval.hit import Hit, StageScore
from retrieval.artifacts import PAGE_COLUMNS, store_root
from retrieval.loaded import LoadedVersion, VersionInfo, local_directory
from retrieval.rerank import Reranker, make_reranker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalConfig:
    """How the retriever searches. Every field can be passed to :meth:`Retriever.open`.

    Attributes:
        retrievers: ``hybrid`` (BM25 and HNSW), ``bm25`` or ``vector`` alone.
        candidates: how many candidates each of BM25 and HNSW returns (N).
        ef: HNSW search breadth; a search for n > ef neighbours searches at breadth n (hnswlib: max(ef, k)).
        fusion: ``rrf`` (reciprocal rank fusion) or ``weighted`` (min-max normalized scores).
        rrf_k: the k of reciprocal rank fusion.
        vector_weight: weight of the vector list in weighted fusion (BM25 gets the rest).
        reranker: ``exact`` (default), ``none``, ``exact:W``, or a cross-encoder name or path.
        rerank_depth: how many fused candidates the reranker rescores.
        model: the query encoder's model; None uses the model the version's manifest names.
        encoder_backend: ``auto`` (ONNX Runtime when the model allows it, else torch), ``onnx``, ``torch``.
        device: the torch encoder's device.
        query_cache_size / result_cache_size: LRU sizes (0 turns a cache off).
        follow: follow the alias (LISTEN/NOTIFY plus a poll every ``poll_interval`` seconds).
        mirror_fraction: share of queries also run against the alias's shadow version.
        mirror_window: how many of the latest mirrored queries the latency medians cover.
        keep_previous: keep the version switched away from loaded, so that the alias moving back to it
            (a rollback) switches at once; costs the memory of a second version.
    """

    retrievers: str = "hybrid"
    candidates: int = 50
    ef: int = 100
    fusion: str = "rrf"
    rrf_k: int = 60
    vector_weight: float = 0.7
    reranker: str | None = "exact"
    rerank_depth: int = 50
    model: str | None = None
    encoder_backend: str = "auto"
    device: str = "cpu"
    query_cache_size: int = 1024
    result_cache_size: int = 1024
    follow: bool = True
    poll_interval: float = 5.0
    mirror_fraction: float = 0.0
    mirror_window: int = 1000
    keep_previous: bool = True

    def __post_init__(self) -> None:
        if self.encoder_backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"encoder_backend must be 'auto', 'onnx' or 'torch', got {self.encoder_backend!r}")
        if self.retrievers not in ("hybrid", "bm25", "vector"):
            raise ValueError(f"retrievers must be 'hybrid', 'bm25' or 'vector', got {self.retrievers!r}")
        if self.fusion not in ("rrf", "weighted"):
            raise ValueError(f"fusion must be 'rrf' or 'weighted', got {self.fusion!r}")
        if self.candidates < 1 or self.rerank_depth < 1:
            raise ValueError("candidates and rerank_depth must be positive")
        if not 0.0 <= self.mirror_fraction <= 1.0:
            raise ValueError(f"mirror_fraction must be within [0, 1], got {self.mirror_fraction}")
        if self.mirror_window < 1:
            raise ValueError(f"mirror_window must be positive, got {self.mirror_window}")


class Hits(list):  # type: ignore[type-arg]
    """The hits of one query. ``exhausted`` is true when filters left fewer than k hits in the whole version."""

    exhausted: bool = False


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # lookups answered / not answered, since the retriever opened
        self.misses = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class MirrorStats:
    """What mirroring queries to the shadow version has shown so far: bounded memory, thread-safe.

    ``queries`` and the mean overlap@10 are streaming aggregates over every mirrored query (a count
    and a sum); the latency medians are over a fixed-size window of the last ``window`` mirrored
    queries, since a median cannot be streamed exactly. Memory is O(window) however long the
    retriever serves.
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"the mirror window must be positive, got {window}")
        self.window = window
        self._lock = threading.Lock()
        self._queries = 0
        self._overlap_sum = 0.0
        self._primary_ms: deque[float] = deque(maxlen=window)
        self._shadow_ms: deque[float] = deque(maxlen=window)

    @property
    def queries(self) -> int:
        return self._queries

    def record(self, overlap_at_10: float, primary_ms: float, shadow_ms: float) -> None:
        """Add one mirrored query: its overlap@10 and both versions' latencies."""
        with self._lock:
            self._queries += 1
            self._overlap_sum += overlap_at_10
            self._primary_ms.append(primary_ms)
            self._shadow_ms.append(shadow_ms)

    def summary(self) -> dict[str, float]:
        """``queries`` and ``mean_overlap_at_10`` over every mirrored query; ``primary_p50_ms`` and
        ``shadow_p50_ms`` over the last ``latency_window`` of them."""
        with self._lock:
            queries, overlap_sum = self._queries, self._overlap_sum
            primary, shadow = list(self._primary_ms), list(self._shadow_ms)
        if not queries:
            return {"queries": 0}
        return {
            "queries": queries,
            "mean_overlap_at_10": overlap_sum / queries,
            "primary_p50_ms": float(np.median(primary)),
            "shadow_p50_ms": float(np.median(shadow)),
            "latency_window": len(primary),
        }


class Retriever:
    """Search the version an alias serves. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, registry_config: RegistryConfig, alias: str, config: RetrievalConfig,
                 encoder: Any = None) -> None:
        self._registry_config = registry_config
        self.alias = alias
        self.config = config
        self._cache_dir = registry_config.home / "cache"
        self._registry = Registry.open(registry_config)  # first use of a fresh database migrates it
        self._registry_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        given = [] if encoder is None else list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
        self._given: dict[str, Any] = {e.model_id: e for e in given}  # the caller's, by model
        self._pinned = set(self._given)
        self._encoders: dict[tuple[str, str | None], Any] = {}  # loaded on demand, by (model, encoder digest)
        self._encoder_lock = threading.Lock()
        self._reranker: Reranker | None = make_reranker(config.reranker, config.device)
        self._query_cache = _LRU(config.query_cache_size)
        self._result_cache = _LRU(config.result_cache_size)
        self._shadow: LoadedVersion | None = None
        self._previous: LoadedVersion | None = None  # the version switched away from (config.keep_previous)
        self._refused: dict[str, str] = {}  # damaged versions and why: never loaded (and hashed) again
        self.mirror = MirrorStats(config.mirror_window)
        self._closed = threading.Event()
        try:
            self._current = self._load(self._resolve())
        except BaseException:
            self._registry.close()
            raise
        self._follower: threading.Thread | None = None
        if config.follow:
            self._follower = threading.Thread(target=self._follow, name="ragpipe-follow", daemon=True)
            self._follower.start()

    # -- opening and following ---------------------------------------------------------------

    @classmethod
    def open(cls, index: str = "docs", database_url: str | None = None, *, encoder: Any = None,
             **config: Any) -> "Retriever":
        """Open a retriever on the alias ``index`` (aliases are named after their index).

        Args:
            index: the alias to search.
            database_url: the registry; None reads ``RAGPIPE_DATABASE_URL``, else the embedded server.
            encoder: an object with ``model_id`` and ``embed(texts)`` to encode queries (an ONNX runner,
                say), or a list of them (one per model, for mirroring to a shadow version of another
                model); by default the model the version's manifest names.
            **config: any :class:`RetrievalConfig` field, plus ``home`` (ragpipe's home directory).

        Raises:
            AliasNotFound: nothing has been published to the alias yet.
            ModelMismatch: ``model`` is not the model the version was embedded with.
        """
        home = config.pop("home", None)
        registry_config = RegistryConfig.from_env(database_url=database_url, home=home)
        return cls(registry_config, index, RetrievalConfig(**config), encoder)

    def _resolve(self, shadow: bool = False) -> VersionInfo | None:
        with self._registry_lock:
            aliases = self._registry.read(self._registry.list_aliases)  # reconnects if the server dropped it
            row = next((a for a in aliases if a.alias == self.alias), None)
            if row is None:
                raise AliasNotFound(f"alias {self.alias!r} does not exist; publish a version with `ragpipe index`")
            name = row.shadow_version if shadow else row.version
            if name is None:
                return None
            version = self._registry.read(self._registry.get_version, name)
        assert version is not None and version.artifact_uri is not None  # an alias serves built versions only
        return VersionInfo(alias=self.alias, index=version.index_name, version=name,
                           artifact_uri=version.artifact_uri, model_id=version.model_id,
                           updated_at=version.published_at or version.validated_at)

    def _load(self, info: VersionInfo | None) -> LoadedVersion:
        assert info is not None
        wanted = None
        if self.config.model is not None:
            from retrieval.models import model_id_of

            wanted = model_id_of(self.config.model)
        elif self._pinned and info.model_id not in self._pinned:
            wanted = sorted(self._pinned)[0]
        if wanted is not None and wanted != info.model_id:
                raise ModelMismatch(
                    f"version {info.version} of alias {self.alias!r} was embedded with {info.model_id!r}; "
                    f"queries would be encoded with {wanted!r}. Open the retriever without `model`, or "
                    f"publish a version built with that model"
                )
        started = time.perf_counter()
        loaded = LoadedVersion(info, local_directory(info.artifact_uri, self._cache_dir))
        logger.info("loaded version %s (%d chunks) in %.2f s", info.version, loaded.size, time.perf_counter() - started)
        return loaded

    def _follow(self) -> None:
        """Switch to newly published versions on the registry's notifications, and re-check after
        every reconnection and poll interval. A failed re-check is retried at the next one; the
        loaded version keeps serving meanwhile."""
        listener = AliasListener(self._registry.url, poll_interval=self.config.poll_interval)
        for change in listener.changes(self._closed):
            if change.alias not in (None, self.alias):
                continue
            try:
                self.refresh()
            except Exception:  # the database went away again: the listener reconnects, then re-checks
                logger.warning("alias follower: cannot refresh alias %s; serving %s until the next check",
                               self.alias, self._current.info.version, exc_info=True)

    def refresh(self) -> bool:
        """Load the alias's current version if it changed; returns whether the retriever switched.

        A version that cannot be loaded is logged and not switched to: the current one keeps
        serving. A damaged one (:class:`VersionCorrupt`) is not tried again; one whose files cannot
        be read now is tried again at the next refresh.
        """
        with self._refresh_lock:
            info = self._resolve()
            switched = False
            if (info is not None and info.version != self._current.info.version and info.version not in self._refused
                    and (loaded := self._previous_or_load(info)) is not None):
                previous = self._current
                self._current = loaded  # one assignment: queries already running keep `previous`
                self._previous = previous if self.config.keep_previous else None
                self._result_cache.clear()
                switched = True
                logger.info("alias %s switched %s -> %s", self.alias, previous.info.version, loaded.info.version)
            self._refresh_shadow()
            return switched

    def _previous_or_load(self, info: VersionInfo) -> LoadedVersion | None:
        """The version switched away from last, when the alias returns to it (a rollback: no reload),
        else the version loaded."""
        previous = self._previous
        if previous is not None and previous.info.version == info.version and previous.info.artifact_uri == info.artifact_uri:
            return previous
        return self._load_or_keep(info)

    def _load_or_keep(self, info: VersionInfo) -> LoadedVersion | None:
        """The version loaded, or None (logged) when it cannot be served and the current one stays."""
        try:
            return self._load(info)
        except VersionUnavailable as exc:
            if isinstance(exc, VersionCorrupt):
                self._refused[info.version] = str(exc)  # its files are immutable: loading again cannot help
            logger.error("alias %s names version %s, which cannot be served: %s; still serving %s",
                         self.alias, info.version, exc, self._current.info.version)
            return None

    def _refresh_shadow(self) -> None:
        if self.config.mirror_fraction <= 0:
            return
        try:
            shadow = self._resolve(shadow=True)
            if shadow is None or shadow.version in self._refused:
                self._shadow = None
            elif self._shadow is None or self._shadow.info.version != shadow.version:
                try:
                    self._shadow = LoadedVersion(shadow, local_directory(shadow.artifact_uri, self._cache_dir))
                except VersionCorrupt as exc:
                    self._refused[shadow.version] = str(exc)
                    raise
        except Exception:  # mirroring is best effort: it never blocks serving the live version
            logger.warning("cannot load the shadow version of alias %s; mirroring paused", self.alias, exc_info=True)
            self._shadow = None

    @property
    def version(self) -> str:
        return self._current.info.version

    @property
    def refused(self) -> dict[str, str]:
        """Versions the alias named that are not served (their files are damaged), and why."""
        return dict(self._refused)

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of each cache since the retriever opened: ``query`` (query vectors) and
        ``result`` (result lists)."""
        return {"query": (self._query_cache.hits, self._query_cache.misses),
                "result": (self._result_cache.hits, self._result_cache.misses)}

    def close(self) -> None:
        self._closed.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        with self._registry_lock:
            self._registry.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- searching -----------------------------------------------------------------------------

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

    def search(self, query: str, k: int = 10, filters: dict[str, Any] | None = None) -> Hits:
        """The ``k`` best chunks for ``query`` with attribution, from one version."""
        version = self._current
        return self._search_on(version, query, None, k, filters)

    def search_many(self, queries: Sequence[str], k: int = 10, filters: dict[str, Any] | None = None) -> list[Hits]:
        """Search several queries on one version: one embedding batch and one HNSW call for all of them
        (hnswlib spreads it over its threads), then BM25, fusion and reranking per query."""
        return self.search_batch([Query(q, k, filters) for q in queries]).hits

    def search_batch(self, queries: Sequence[Query]) -> BatchResult:
        """Search queries of their own k and filters on one version (the one current when the call
        starts, whatever the alias does meanwhile): one embedding batch, one HNSW call at the depth
        the deepest query needs, then BM25, fusion and reranking per query."""
        version = self._current
        stages = {"embed": 0.0, "vector": 0.0, "rank": 0.0}
        if not queries:
            return BatchResult(self.alias, version.info.version, [], stages)
        started = time.perf_counter()
        vectors = self._embed([q.text for q in queries], version)
        stages["embed"] = time.perf_counter() - started
        started = time.perf_counter()
        n = min(max(self.config.candidates, max(q.k for q in queries)), version.size)
        knn = None
        if n:
            with telemetry.span("retrieval.vector_search", {"retrieval.candidates": n, "retrieval.queries": len(queries)}):
                try:
                    knn = version.knn_query(vectors, n, self.config.ef)
                except RuntimeError:  # a query got fewer than n neighbours: each one alone, exactly if need be
                    logger.info("HNSW returned fewer than %d neighbours for a query of the batch", n)
        stages["vector"] = time.perf_counter() - started
        started = time.perf_counter()
        hits = []
        ef = self.config.ef
        for i, q in enumerate(queries):
            # hnswlib searches at breadth max(ef, depth): a shallower query searching at the same breadth
            # gets the first of the batch's neighbours; one searching narrower searches alone
            depth = min(max(self.config.candidates, q.k), version.size)
            own = None if knn is None or max(ef, depth) != max(ef, n) else (knn[0][i][:depth], knn[1][i][:depth])
            hits.append(self._search_on(version, q.text, vectors[i], q.k, dict(q.filters) if q.filters else None, own))
        stages["rank"] = time.perf_counter() - started
        return BatchResult(self.alias, version.info.version, hits, stages)

    def _search_on(
        self, version: LoadedVersion, query: str, vector: np.ndarray | None, k: int, filters: dict[str, Any] | None,
        knn: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Hits:
        filters = _normalized(filters)
        # while chunks of the version still wait for their valid_from, results depend on the clock
        cacheable = version.all_visible_by(datetime.now(timezone.utc)) or (filters or {}).get("as_of") is not None
        key = (version.info.version, query, k, json.dumps(filters, sort_keys=True, default=str))
        cached = self._result_cache.get(key) if cacheable else None
        if cached is not None:
            return cached
        started = time.perf_counter()
        with telemetry.span("retrieval.search", {
            "retrieval.index_version": version.info.version,
            "retrieval.index_updated_at": version.info.updated_at.isoformat() if version.info.updated_at else "",
            "retrieval.alias": self.alias,
            "retrieval.k": k,
        }) as root:
            if vector is None:
                vector = self._embed([query], version)[0]
            hits = self._ranked(version, query, vector, k, filters, knn)
            for hit in hits:
                telemetry.event(root, "chunk_retrieved", {"doc_id": hit.doc_id, "chunk_id": hit.chunk_id,
                                                          "score": hit.score, "source": hit.source_uri})
        if cacheable:
            self._result_cache.put(key, hits)
        if self.config.mirror_fraction and self._shadow is not None and random.random() < self.config.mirror_fraction:
            self._mirror(query, hits, k, filters, (time.perf_counter() - started) * 1000)
        return hits

    def _mirror(self, query: str, primary: Hits, k: int, filters: dict[str, Any] | None, primary_ms: float) -> None:
        shadow = self._shadow
        if shadow is None:
            return
        started = time.perf_counter()
        try:
            vector = self._embed([query], shadow)[0]
            other = self._ranked(shadow, query, vector, max(k, 10), filters)
        except Exception:  # mirroring never fails the user's query
            logger.warning("mirror query on shadow %s failed", shadow.info.version, exc_info=True)
            return
        mine = {h.chunk_id for h in primary[:10]}
        theirs = {h.chunk_id for h in other[:10]}
        self.mirror.record(len(mine & theirs) / max(1, min(10, len(mine) or 1)), primary_ms,
                           (time.perf_counter() - started) * 1000)

    def _ranked(self, version: LoadedVersion, query: str, vector: np.ndarray, k: int,
                filters: dict[str, Any] | None, knn: tuple[np.ndarray, np.ndarray] | None = None) -> Hits:
        n = max(self.config.candidates, k)
        while True:
            hits, exhausted = self._ranked_once(version, query, vector, k, filters, n, knn)
            knn = None  # computed for the first depth only
            if len(hits) >= k or exhausted:
                result = Hits(hits[:k])
                result.exhausted = len(hits) < k
                return result
            n *= 4  # filters removed too many candidates: look deeper

    def _ranked_once(self, version: LoadedVersion, query: str, vector: np.ndarray, k: int,
                     filters: dict[str, Any] | None, n: int,
                     knn: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[Hit], bool]:
        n = min(n, version.size)
        exhausted = n >= version.size
        if n == 0:
            return [], True
        if knn is not None and len(knn[0]) == n:
            labels, distances = knn
        else:
            with telemetry.span("retrieval.vector_search", {"retrieval.candidates": n}):
                labels, distances = _vector_search(version, vector, n, self.config.ef)
        vec_keys = [int(x) for x in labels]
        vec_scores = {key: 1.0 - float(d) for key, d in zip(vec_keys, distances)}
        with telemetry.span("retrieval.bm25_search", {"retrieval.candidates": n}):
            bm_keys_arr, bm_scores_arr, all_bm25 = version.bm25.top(query, n)
            bm_keys = [int(x) for x in bm_keys_arr]
            bm_scores = dict(zip(bm_keys, bm_scores_arr.tolist()))
        if self.config.retrievers == "bm25":
            vec_keys, vec_scores = [], {}
        elif self.config.retrievers == "vector":
            bm_keys, bm_scores = [], {}
        with telemetry.span("retrieval.fusion", {"retrieval.fusion": self.config.fusion}):
            if self.config.fusion == "rrf":
                fused = reciprocal_rank_fusion([vec_keys, bm_keys], self.config.rrf_k)
            else:
                w = self.config.vector_weight
                fused = weighted_fusion([(vec_scores, w), (bm_scores, 1.0 - w)])
            order = sorted(fused, key=lambda key: (-fused[key], key))
        order = [key for key in order if self._passes(version, key, filters)]
        rerank_scores: dict[int, float] = {}
        if self._reranker is not None and order:
            depth = order[: max(self.config.rerank_depth, k)]
            with telemetry.span("retrieval.rerank", {"retrieval.reranker": self._reranker.name, "retrieval.depth": len(depth)}):
                rerank_scores = self._reranker.rerank(query, vector, depth, version, all_bm25)
            order = sorted(depth, key=lambda key: (-rerank_scores[key], key)) + order[len(depth):]
        vec_rank = {key: i for i, key in enumerate(vec_keys, start=1)}
        bm_rank = {key: i for i, key in enumerate(bm_keys, start=1)}
        fused_rank = {key: i for i, key in enumerate(sorted(fused, key=lambda x: (-fused[x], x)), start=1)}
        rerank_rank = {key: i for i, key in enumerate(sorted(rerank_scores, key=lambda x: (-rerank_scores[x], x)), start=1)}
        hits = [
            self._hit(version, key,
                      StageScore(bm_scores.get(key), bm_rank.get(key)),
                      StageScore(vec_scores.get(key), vec_rank.get(key)),
                      StageScore(fused.get(key), fused_rank.get(key)),
                      StageScore(rerank_scores.get(key), rerank_rank.get(key)))
            for key in order[:k]
        ]
        return hits, exhausted

    def _passes(self, version: LoadedVersion, key: int, filters: dict[str, Any] | None) -> bool:
        row = version.row[key]
        now = (filters or {}).get("as_of") or datetime.now(timezone.utc)
        if not version.all_visible_by(now):
            valid_from = version.columns["valid_from"][row]
            if valid_from is not None and valid_from > now:
                return False  # staged: not visible yet
        if not filters:
            return True
        prefix = filters.get("doc_id_prefix")
        if prefix and not version.columns["doc_id"][row].startswith(prefix):
            return False
        wanted = filters.get("metadata") or {}
        if wanted:
            meta = version.metadata(row)
            for name, value in wanted.items():
                have = meta.get(name)
                if isinstance(value, (list, tuple, set, frozenset)):
                    if have not in value:
                        return False
                elif have != value:
                    return False
        return True

    def _hit(self, version: LoadedVersion, key: int, bm25: StageScore, vector: StageScore, fused: StageScore,
             rerank: StageScore) -> Hit:
        row = version.row[key]
        c = version.columns
        return Hit(
            doc_id=c["doc_id"][row], chunk_id=c["chunk_id"][row], text=c["text"][row],
            source_uri=c["source_uri"][row], heading_path=tuple(c["heading_path"][row]),
            char_start=c["char_start"][row], char_end=c["char_end"][row], ordinal=c["ordinal"][row],
            chunk_hash=c["chunk_hash"][row], index_version=version.info.version, alias=self.alias,
            version_updated_at=version.info.updated_at, model_id=version.info.model_id,
            bm25=bm25, vector=vector, fused=fused, rerank=rerank, metadata=version.metadata(row),
            **{name: c[name][row] for name in PAGE_COLUMNS},
        )


def _vector_search(version: LoadedVersion, vector: np.ndarray, n: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """HNSW top-n; exact search over the full-precision matrix when n covers the whole version or
    the graph cannot return n neighbours (hnswlib raises then)."""
    if n < version.size:
        try:
            found = version.knn_query(vector, n, ef)
            return found[0][0], found[1][0]
        except RuntimeError:
            logger.info("HNSW returned fewer than %d neighbours; searching exactly", n)
    scores = np.asarray(version.matrix, dtype=np.float32) @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")[:n]
    return version.keys[order], (1.0 - scores[order]).astype(np.float32)


def _normalized(filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Filters with ``as_of`` as an aware datetime (ISO strings accepted, naive times are UTC)."""
    if not filters or filters.get("as_of") is None:
        return filters
    as_of = filters["as_of"]
    if isinstance(as_of, str):
        as_of = datetime.fromisoformat(as_of)
    if not isinstance(as_of, datetime):
        raise ValueError(f"filters['as_of'] must be a datetime or an ISO 8601 string, got {as_of!r}")
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    return {**filters, "as_of": as_of}


__all__ = ["Hits", "MirrorStats", "RetrievalConfig", "Retriever"]

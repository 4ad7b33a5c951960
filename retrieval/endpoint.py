"""Embeddings from an OpenAI-compatible HTTP endpoint: documents when indexing, queries when searching.

``RAGPIPE_MODEL=openai:NAME`` embeds through ``POST RAGPIPE_EMBEDDINGS_URL/embeddings`` with
``{"model": NAME, "input": [...]}`` (OpenAI, Azure's OpenAI-compatible route, vLLM, Text Embeddings
Inference, LiteLLM, Ollama's ``/v1``). The model id is ``openai:NAME``: it keys the same
content-addressed embedding cache as any other model, so a text is sent once. A version built this
way stores no ONNX encoder; its manifest's ``model.endpoint`` says that queries go to the same model
over HTTP, and the retriever sends them there. Only the standard library is used (``urllib``), so a
base install searches such a version.

- Batching: at most ``batch_size`` inputs per request.
- Retries: 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times with
  exponential backoff (0.5 s doubling to 20 s) and jitter (each wait is drawn from its upper half);
  a ``Retry-After`` header (seconds or an HTTP date) is waited out instead. Other 4xx answers fail at
  once. A request that still fails raises :class:`EndpointUnavailable` (transient: retry the run).
- Rate limit: request starts are spaced so that neither ``requests_per_second`` nor
  ``tokens_per_minute`` is exceeded over any interval (no bursts). Tokens are estimated before
  sending as a quarter of each input's characters, rounded up (OpenAI's rule of thumb).
- Vectors: the dimension is learned from the first response (or given by the version's manifest)
  and every later response must match it; vectors are L2-normalized here, whatever the server did.
- The API key (``RAGPIPE_EMBEDDINGS_API_KEY``, else ``OPENAI_API_KEY``) goes into the
  ``Authorization`` header only: never into a log line, an error message, a manifest or the registry
  (messages show the URL without credentials or query, and any echo of the key is masked).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import EndpointUnavailable, ModelError

logger = logging.getLogger(__name__)

PREFIX = "openai:"
API = "openai-embeddings"
MAX_RETRY_AFTER = 300.0  # a server asking for a longer pause gets an error the orchestrator retries later


def is_endpoint_model(model: str) -> bool:
    return model.startswith(PREFIX)


@dataclass(frozen=True)
class EndpointConfig:
    """How to reach the endpoint; every field but the key is a ``RAGPIPE_EMBEDDINGS_*`` variable.

    Attributes:
        url: base URL the ``/embeddings`` path is appended to (``https://api.openai.com/v1``); a URL
            that already ends in ``/embeddings`` is used as it is.
        api_key: the bearer token, from the environment only (left out of ``repr``).
        requests_per_second: most request starts per second (0: no limit).
        tokens_per_minute: most estimated input tokens per minute (0: no limit).
        max_retries: retries of one request after a 429, 5xx or connection failure.
        timeout: seconds to wait for one response.
        max_tokens: the most tokens (counted with the default model's tokenizer) a chunk holds.
    """

    url: str = ""
    api_key: str | None = field(default=None, repr=False)
    requests_per_second: float = 0.0
    tokens_per_minute: float = 0.0
    max_retries: int = 6
    timeout: float = 60.0
    max_tokens: int = 254
    backoff_base: float = 0.5
    backoff_max: float = 20.0

    def __post_init__(self) -> None:
        if min(self.requests_per_second, self.tokens_per_minute, self.max_retries) < 0 or self.timeout <= 0:
            raise ModelError("RAGPIPE_EMBEDDINGS_REQUESTS_PER_SECOND, _TOKENS_PER_MINUTE and _MAX_RETRIES must not be "
                             "negative, RAGPIPE_EMBEDDINGS_TIMEOUT must be positive")
        if self.max_tokens < 8:
            raise ModelError(f"RAGPIPE_EMBEDDINGS_MAX_TOKENS must be at least 8, got {self.max_tokens}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, default_url: str = "") -> "EndpointConfig":
        """Read ``RAGPIPE_EMBEDDINGS_*`` at run time; ``default_url`` serves when the URL is unset
        (a retriever passes the one the version's manifest records)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"url": env.get("RAGPIPE_EMBEDDINGS_URL") or default_url,
                                  "api_key": env.get("RAGPIPE_EMBEDDINGS_API_KEY") or env.get("OPENAI_API_KEY") or None}
        for name, kind in (("requests_per_second", float), ("tokens_per_minute", float), ("max_retries", int),
                           ("timeout", float), ("max_tokens", int)):
            raw = env.get(f"RAGPIPE_EMBEDDINGS_{name.upper()}")
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ModelError(f"RAGPIPE_EMBEDDINGS_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    @classmethod
    def variables(cls) -> list[str]:
        """The environment variables this configuration reads (the README documents each)."""
        return [f"RAGPIPE_EMBEDDINGS_{f.name.upper()}" for f in fields(cls) if not f.name.startswith("backoff")]

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/embeddings") else f"{base}/embeddings"


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: what messages and manifests may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Pacer:
    """Spaces request starts: each request reserves 1/rps seconds and its tokens' share of a minute
    before the next may start, so every interval stays within both limits."""

    def __init__(self, requests_per_second: float, tokens_per_minute: float) -> None:
        self._rps = requests_per_second
        self._tpm = tokens_per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, tokens: int) -> None:
        gap = max(1.0 / self._rps if self._rps > 0 else 0.0, tokens * 60.0 / self._tpm if self._tpm > 0 else 0.0)
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + gap
        if start > now:
            time.sleep(start - now)


def estimate_tokens(texts: Sequence[str]) -> int:
    """Input tokens of a request as the rate limit counts them: a quarter of the characters, rounded up."""
    return sum(max(1, math.ceil(len(t) / 4)) for t in texts)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class EndpointEmbedder:
    """Embed texts with ``NAME`` behind an OpenAI-compatible endpoint (thread-safe)."""

    def __init__(self, model: str, config: EndpointConfig, *, batch_size: int = 64, dim: int | None = None) -> None:
        name = model.removeprefix(PREFIX)
        if not name:
            raise ModelError(f"{model!r} names no model: use openai:MODEL_NAME")
        if not config.url:
            raise ModelError(f"model {model!r} needs the endpoint's base URL: set RAGPIPE_EMBEDDINGS_URL")
        if urllib.parse.urlsplit(config.url).scheme not in ("http", "https"):
            raise ModelError(f"RAGPIPE_EMBEDDINGS_URL must be an http(s) URL, got {public_url(config.url)!r}")
        self.name = name
        self.model_id = f"{PREFIX}{name}"
        self.config = config
        self.batch_size = max(1, batch_size)
        self.max_tokens = config.max_tokens
        self.requests = 0  # HTTP requests sent, retries included
        self._dim = dim
        self._pacer = _Pacer(config.requests_per_second, config.tokens_per_minute)
        self._dim_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """The dimension: learned from the first response (one short request when none came yet)."""
        if self._dim is None:
            self.embed(["dimension"])
        assert self._dim is not None
        return self._dim

    def describe(self) -> dict[str, str]:
        """What a version's manifest records (``model.endpoint``): queries use this model over HTTP."""
        return {"api": API, "model": self.name, "url": public_url(self.config.url)}

    def token_counter(self) -> Any:
        """Chunks are sized with the default model's tokenizer (a close count for English text;
        ``max_tokens`` leaves room for the endpoint model's own)."""
        from retrieval.models import DEFAULT_MODEL, HFTokenCounter, resolve_model

        return HFTokenCounter(Path(resolve_model(DEFAULT_MODEL)[1]) / "tokenizer.json", self.model_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``, in order, ``batch_size`` inputs per request."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        parts = [self._request(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts)

    # -- one request ------------------------------------------------------------------------------

    def _request(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.name, "input": texts, "encoding_format": "float"}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "ragpipe"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        tokens = estimate_tokens(texts)
        where = public_url(self.config.endpoint)
        for attempt in range(self.config.max_retries + 1):
            self._pacer.wait(tokens)
            self.requests += 1
            retry_after = None
            try:
                request = urllib.request.Request(self.config.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    payload = response.read()
                return self._vectors(payload, len(texts), where)
            except urllib.error.HTTPError as exc:
                detail = self._mask(exc.read()[:300].decode("utf-8", "replace"))
                if exc.code != 429 and exc.code < 500:
                    raise ModelError(f"embeddings endpoint {where} refused model {self.name!r}: HTTP {exc.code} "
                                     f"{detail}".rstrip()) from None
                reason = f"HTTP {exc.code}"
                retry_after = retry_after_seconds(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # timeouts included
                reason = self._mask(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
            if retry_after is not None and retry_after > MAX_RETRY_AFTER:
                raise EndpointUnavailable(f"embeddings endpoint {where} asks to retry after {retry_after:.0f} s "
                                          f"({reason}); run again later")
            if attempt == self.config.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            logger.warning("embeddings endpoint %s: %s; retry %d of %d in %.2f s", where, reason, attempt + 1,
                           self.config.max_retries, delay)
            time.sleep(delay)
        raise EndpointUnavailable(f"embeddings endpoint {where} failed {self.config.max_retries + 1} times "
                                  f"(last: {reason}); run again later")

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.config.backoff_max, self.config.backoff_base * 2 ** attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _mask(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key else text

    def _vectors(self, payload: bytes, count: int, where: str) -> np.ndarray:
        try:
            data = json.loads(payload)["data"]
            rows = sorted(data, key=lambda item: int(item["index"]))
            indexes = [int(item["index"]) for item in rows]
            vectors = [item["embedding"] for item in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"embeddings endpoint {where} sent no embeddings response ({type(exc).__name__})") from None
        if indexes != list(range(count)):
            raise ModelError(f"embeddings endpoint {where} answered {len(indexes)} embeddings for {count} inputs")
        try:
            matrix = np.asarray(vectors, dtype=np.float32)
        except (ValueError, TypeError):
            raise ModelError(f"embeddings endpoint {where} sent embeddings of different lengths") from None
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise ModelError(f"embeddings endpoint {where} sent embeddings of shape {matrix.shape}")
        with self._dim_lock:
            if self._dim is None:
                self._dim = int(matrix.shape[1])
        if matrix.shape[1] != self._dim:
            raise ModelError(f"embeddings endpoint {where}: model {self.name!r} returned {matrix.shape[1]} dimensions, "
                             f"earlier {self._dim} (the version's dimension); another model behind the same name?")
        if not np.isfinite(matrix).all():
            raise ModelError(f"embeddings endpoint {where}: model {self.name!r} returned non-finite values")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ModelError(f"embeddings endpoint {where}: model {self.name!r} returned a zero vector")
        return matrix / norms


def endpoint_encoder(recorded: Mapping[str, Any], *, dim: int | None = None) -> EndpointEmbedder:
    """The query encoder of a version whose manifest records ``model.endpoint``: the same model,
    at ``RAGPIPE_EMBEDDINGS_URL`` when set, else at the URL the manifest records."""
    if recorded.get("api") != API:
        raise ModelError(f"the version's queries need an endpoint speaking {recorded.get('api')!r}; "
                         f"this library speaks {API!r}")
    config = EndpointConfig.from_env(default_url=str(recorded.get("url") or ""))
    return EndpointEmbedder(PREFIX + str(recorded["model"]), config, dim=dim)

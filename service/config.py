"""The service's configuration: one frozen dataclass, read from RAGPIPE_SERVE_* variables and flags at run time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from registry import RegistryConfig


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is answered with 422 naming the field.

    Attributes:
        max_query_chars: characters of one query.
        max_k: hits per query.
        max_batch: queries of one ``/v1/search_many`` request.
        max_body_bytes: bytes of a request body.
    """

    max_query_chars: int = 2000
    max_k: int = 100
    max_batch: int = 64
    max_body_bytes: int = 256 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """How ``ragpipe serve`` serves. Each field has a ``RAGPIPE_SERVE_<NAME>`` variable (tuples:
    comma-separated); flags override them.

    Attributes:
        indexes: the aliases served; empty serves every alias in the registry (and those created later).
        default_index: the alias a request without ``index`` searches; None: the first of ``indexes``,
            else ``RAGPIPE_INDEX`` when served, else the only alias served.
        host, port, workers: where uvicorn listens and how many processes it runs.
        batch_window_ms: how long the first query of a batch waits for others.
        max_batch_queries: the most queries one encoder and HNSW call takes.
        queue_size: queries waiting (per alias) beyond which requests are shed with 429.
        max_queue_wait_ms: shed a request when the queries ahead of it would take longer than this at
            the recent throughput (a latency target); None: ``deadline_s``.
        search_threads: threads running batches (CPU work off the event loop).
        deadline_s: a request not answered within this is answered 504.
        remember_requests / remember_s: how many responses, and for how long, feedback can refer to.
        tokens_file: a file of bearer tokens, one a line (besides ``RAGPIPE_SERVE_TOKENS``).
        cors_origins: origins allowed cross-origin; empty turns CORS off.
        poll_interval: how often a retriever re-checks its alias besides notifications.
        ef: HNSW search breadth of every retriever (0: the breadth validation measured per segment).
    """

    indexes: tuple[str, ...] = ()
    default_index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    batch_window_ms: float = 2.0
    max_batch_queries: int = 256
    queue_size: int = 1024
    max_queue_wait_ms: float | None = None
    search_threads: int = 2
    deadline_s: float = 10.0
    remember_requests: int = 100_000
    remember_s: float = 3600.0
    tokens_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    poll_interval: float = 5.0
    ef: int = 0  # 0: the breadth each version recorded
    limits: Limits = field(default_factory=Limits)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __post_init__(self) -> None:
        for name in ("workers", "max_batch_queries", "queue_size", "search_threads", "remember_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve setting {name} must be at least 1, got {getattr(self, name)}")
        if self.deadline_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("serve settings deadline_s must be positive and batch_window_ms not negative")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "ServeConfig":
        """``RAGPIPE_SERVE_*`` (and ``RAGPIPE_MAX_*`` for :class:`Limits`), then non-None ``overrides``.

        Raises:
            ValueError: a variable does not parse; the message names it.
        """
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("limits", "registry"):
                continue
            raw = env.get(f"RAGPIPE_SERVE_{f.name.upper()}")
            if raw:
                default = f.default if f.default is not None else 0.0 if str(f.type).startswith("float") else None
                values[f.name] = _parse(f"RAGPIPE_SERVE_{f.name.upper()}", raw, default)
        limits = {}
        for f in fields(Limits):
            raw = env.get(f"RAGPIPE_SERVE_{f.name.upper()}")
            if raw:
                limits[f.name] = _parse(f"RAGPIPE_SERVE_{f.name.upper()}", raw, 0)
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        limit_overrides = {k: given.pop(k) for k in list(given) if k in Limits.__dataclass_fields__}
        database_url = given.pop("database_url", None) or env.get("RAGPIPE_DATABASE_URL") or None
        home = given.pop("home", None) or env.get("RAGPIPE_HOME") or None
        config = cls(**values, limits=Limits(**{**limits, **limit_overrides}),
                     registry=RegistryConfig.from_env(database_url=database_url, home=home))
        return replace(config, **given)

    def load_tokens(self) -> frozenset[str]:
        """The bearer tokens accepted: ``RAGPIPE_SERVE_TOKENS`` (comma-separated) and the lines of
        ``tokens_file``; empty means no authentication. Never logged."""
        tokens = {t.strip() for t in os.environ.get("RAGPIPE_SERVE_TOKENS", "").split(",") if t.strip()}
        if self.tokens_file:
            text = Path(self.tokens_file).read_text(encoding="utf-8")
            tokens |= {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
        return frozenset(tokens)


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {type(default).__name__}") from None
    return raw

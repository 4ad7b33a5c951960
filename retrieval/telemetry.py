"""OpenTelemetry spans and events of a search; silent (no-op) when no SDK is configured."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import trace
except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
    trace = None  # type: ignore[assignment]

TRACER_NAME = "ragpipe.retrieval"


@contextmanager
def span(name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
    """A span named ``name`` under the current one (the tracer is looked up at call time)."""
    if trace is None:
        yield None
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(name, attributes=attributes or {}) as current:
        yield current


def event(current: Any, name: str, attributes: dict[str, Any]) -> None:
    if current is not None:
        current.add_event(name, attributes={k: v for k, v in attributes.items() if v is not None})

"""A local HTTP server that speaks the OpenAI embeddings API, for tests: POST /v1/embeddings
{model, input: [...]} -> {data: [{embedding, index}], model, usage}.

Vectors are deterministic (feature-hashed words, as pipeline.deterministic.DeterministicEmbedder
makes them, scaled by 3 so that the client has to normalize them). The server records every
request (arrival time, model, inputs, whether the key was right) and can be told to answer the
next requests with given failures (429 with a Retry-After, 500, ...).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    model: str
    inputs: list[str]
    authorized: bool
    status: int = 200


@dataclass
class Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "try again"}}'


class EmbeddingsServer:
    """Start with ``with EmbeddingsServer(dim=64) as server:``; ``server.url`` is the base URL."""

    def __init__(self, dim: int = 64, api_key: str | None = None) -> None:
        from pipeline.deterministic import DeterministicEmbedder

        self.dim = dim
        self.api_key = api_key
        self.received: list[Received] = []
        self.failures: deque[Failure] = deque()
        self.dims: dict[str, int] = {}  # model name -> another dimension to answer with
        self._embedder = DeterministicEmbedder(dim=dim)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail_next(self, *failures: Failure) -> None:
        self.failures.extend(failures)

    def served(self) -> list[Received]:
        """The requests answered with embeddings."""
        return [r for r in self.received if r.status == 200]

    def reset(self) -> None:
        with self._lock:
            self.received.clear()

    def __enter__(self) -> "EmbeddingsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _vectors(self, model: str, inputs: list[str]) -> list[list[float]]:
        dim = self.dims.get(model, self.dim)
        with self._lock:
            vectors = self._embedder.embed(inputs) * 3.0
        if dim != self.dim:
            vectors = vectors[:, :dim] if dim < self.dim else vectors.repeat(math.ceil(dim / self.dim), axis=1)[:, :dim]
        return vectors.tolist()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                at = time.monotonic()
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                authorized = server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}"
                record = Received(at, payload["model"], list(payload["input"]), authorized)
                with server._lock:
                    server.received.append(record)
                    failure = server.failures.popleft() if server.failures else None
                if self.path != "/v1/embeddings":
                    record.status = 404
                    return self._send(404, '{"error": {"message": "no such route"}}')
                if not authorized:
                    record.status = 401
                    given = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {given}"}}))
                if failure is not None:
                    record.status = failure.status
                    return self._send(failure.status, failure.body, failure.headers)
                inputs = record.inputs
                data = [{"object": "embedding", "index": i, "embedding": v}
                        for i, v in enumerate(server._vectors(record.model, inputs))]
                tokens = sum(max(1, math.ceil(len(t) / 4)) for t in inputs)
                self._send(200, json.dumps({"object": "list", "data": data[::-1], "model": record.model,
                                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))

        return Handler

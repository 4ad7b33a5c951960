"""Bearer-token authentication and the request body limit: checks at the edge, before a handler runs."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def token_accepted(header: str | None, tokens: frozenset[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``tokens`` (``Bearer TOKEN``). Every token is
    compared in constant time, so the time taken says nothing about which one nearly matched."""
    if not tokens:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    accepted = False
    for token in tokens:
        accepted |= hmac.compare_digest(given, token.encode())
    return accepted


class BodyLimit:
    """Answers 422 (naming ``body`` and the limit) to a request whose body exceeds ``max_bytes``, by its
    Content-Length or, without one, as soon as the bytes received pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": [{"loc": ["body"], "type": "too_large",
                                       "msg": f"the request body exceeds {self.max_bytes} bytes "
                                              "(RAGPIPE_SERVE_MAX_BODY_BYTES)"}]}).encode()
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass

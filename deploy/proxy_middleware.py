"""ASGI middleware in Serve's HTTP proxy, and the ingress's half of what it sends.

Runs in Serve's proxy process: every serve mode names ``proxy_middlewares`` in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (deploy/launch.py, the Helm chart).

- ``ReplicaGoneAs503``: when the ingress replica holding a request dies before the response
  starts (with the engine in the ingress, that is the engine's replica), Serve 2.60's proxy
  sends nothing (its ``send_http_response_on_exception`` answers only 408, 429 and 503) and
  uvicorn answers a bare ``500 Internal Server Error``: not retryable, and not the OpenAI error
  body every other error has. Here that becomes a 503 with the body, naming the request id: the
  client's ``x-request-id``, else one put there now, which Serve then uses as the request's id
  (its logs, the proxy's warning with Ray's exception among them, name it).
- ``InlineBody`` / ``skip_serves_body_fetch``: Serve's proxy sends a replica only the
  request's ASGI scope; the replica then fetches the body back with an actor call to the proxy,
  a round trip on every request's critical path (TTFT). The proxy half reads a body of known,
  bounded length first and puts it in the scope; the ingress half hands it to the app from
  there. The body is still replayed to Serve as sent, so a replica without the ingress half (an
  app of someone else's on the same cluster) sees what it always did.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..proto.servicer import replica_gone
from .errors import APIError

logger = logging.getLogger(__name__)
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]
# Serve takes a request's id from this header (its SERVE_HTTP_REQUEST_ID_HEADER).
REQUEST_ID_HEADER = b"x-request-id"
# Where InlineBody leaves the body in the scope, and the largest it inlines: a bigger body would
# cross twice (in the scope, then Serve's fetch), so it takes Serve's path alone. 0 turns it off
# (read in the proxy's process, so it belongs in the environment of the node's `ray start`).
BODY_SCOPE_KEY = "segserve.body"
_INLINE_MAX_ENV = "SEGSERVE_PROXY_INLINE_BODY_MAX"


def _inline_body_max() -> int:
    raw = os.environ.get(_INLINE_MAX_ENV, str(1 << 20))
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"{_INLINE_MAX_ENV} must be a byte count (0: off), not {raw!r}") from None


MAX_INLINE_BODY = _inline_body_max()


class ReplicaGoneAs503:
    """ASGI middleware: a request that ended with no response gets the 503 of a vanished replica."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = dict(scope["headers"]).get(REQUEST_ID_HEADER)
        if request_id is None:  # give it one now, so that the proxy's log and the 503 agree
            request_id = uuid.uuid4().hex.encode()
            scope["headers"] = [*scope["headers"], (REQUEST_ID_HEADER, request_id)]
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, receive, watched_send)
        if not started:
            await _send_replica_gone(send, request_id.decode("latin-1"))


async def _send_replica_gone(send: Send, request_id: str) -> None:
    body = json.dumps(APIError(503, replica_gone(request_id)).body()).encode()
    try:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (REQUEST_ID_HEADER, request_id.encode("latin-1"))]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
    except OSError:  # the client has gone too (Serve's 499): nobody to answer
        pass


class InlineBody:
    """Proxy side: a body of declared length up to ``MAX_INLINE_BODY`` travels in the scope."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        length = _declared_length(scope) if scope["type"] == "http" else None
        if length is None or length > MAX_INLINE_BODY or not MAX_INLINE_BODY:
            await self.app(scope, receive, send)
            return
        read: list[Message] = []  # every message taken from the client, replayed below
        chunks: list[bytes] = []
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":  # gone before the body arrived: Serve's path
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                scope = {**scope, BODY_SCOPE_KEY: b"".join(chunks)}
                break

        async def replay() -> Message:
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, send)


def skip_serves_body_fetch() -> bool:
    """Ingress side, once per replica process: a request whose body the proxy inlined gets its
    ASGI messages from the scope, not from an actor call back to the proxy. Serve 2.60 looks the
    proxy actor up by name (a blocking GCS call, ~1 ms) and calls it for every request, before and
    while the app reads the body. After the body nothing more comes: a client that leaves reaches
    the replica as the proxy's cancel of the call (the proxy watches the connection: Serve's
    ``disconnected_task``). False, and Serve's fetch stays, where Serve's internals are not what
    this was written against."""
    try:
        from ray.serve._private.common import StreamingHTTPRequest

        fetch_from_proxy = StreamingHTTPRequest.receive_asgi_messages.fget
    except (ImportError, AttributeError):
        logger.warning("Serve's StreamingHTTPRequest has changed: HTTP bodies are fetched from "
                       "the proxy as Serve does")  # fmt: skip
        return False
    if getattr(fetch_from_proxy, "inlined", False):
        return True

    def receive_asgi_messages(request: Any) -> Callable[[Any], Awaitable[bytes]]:
        body = request.asgi_scope.get(BODY_SCOPE_KEY)
        return fetch_from_proxy(request) if body is None else _InlinedMessages(body)

    receive_asgi_messages.inlined = True  # type: ignore[attr-defined]
    StreamingHTTPRequest.receive_asgi_messages = property(receive_asgi_messages)
    return True


class _InlinedMessages:
    """Answers Serve's fetch as the proxy would: the pickled body message, then nothing until
    Serve cancels the fetch at the request's end."""

    def __init__(self, body: bytes) -> None:
        self._first: bytes | None = pickle.dumps(
            [{"type": "http.request", "body": body, "more_body": False}])

    async def __call__(self, request_metadata: Any) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await asyncio.get_running_loop().create_future()


def _declared_length(scope: Message) -> int | None:
    """The body length a request declares, or None (chunked, none, or not a number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def proxy_middlewares() -> list[Any]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaGoneAs503), Middleware(InlineBody)]

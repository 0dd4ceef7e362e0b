"""Serve's HTTP proxy, answering in the service's shape when the ingress replica cannot.

Runs in Serve's proxy process: every serve mode names ``proxy_middlewares`` in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (deploy/launch.py, the Helm chart). When the
ingress replica holding a request dies before the response starts (with the engine in the
ingress, that is the engine's replica), Serve 2.60's proxy sends nothing (its
``send_http_response_on_exception`` answers only 408, 429 and 503) and uvicorn answers a bare
``500 Internal Server Error``: not retryable, and not the OpenAI error body every other error
has. Here that becomes a 503 with the body, naming the request id: the client's
``x-request-id``, else one put there now, which Serve then uses as the request's id (its logs,
the proxy's warning with Ray's exception among them, name it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..proto.servicer import replica_gone
from .errors import APIError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Serve takes a request's id from this header (its SERVE_HTTP_REQUEST_ID_HEADER).
REQUEST_ID_HEADER = b"x-request-id"


class ReplicaGoneAs503:
    """ASGI middleware: a request that ended with no response gets the 503 of a vanished replica."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
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


def proxy_middlewares() -> list[Any]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaGoneAs503)]

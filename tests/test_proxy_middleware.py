"""The body Serve's proxy inlines in the scope (deploy/proxy_middleware.py), against hand-built
ASGI messages: what the proxy's app and the ingress's app each receive."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from segserve.deploy.proxy_middleware import (
    BODY_SCOPE_KEY,
    MAX_INLINE_BODY,
    InlineBody,
    skip_serves_body_fetch,
)

DISCONNECT = {"type": "http.disconnect"}


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
            "query_string": b"", "root_path": ""}  # fmt: skip


def _client(*messages: dict[str, Any]):
    """A client's receive: the messages, then (as uvicorn does once the body is read) the
    disconnect, which blocks until ``gone`` is set."""
    queue = list(messages)
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await gone.wait()
        return DISCONNECT

    return receive, gone


async def _through_proxy(scope: dict[str, Any], receive: Any, n: int) -> tuple[dict, list]:
    """Run InlineBody over an app that records its scope and its first ``n`` messages."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["scope"] = scope
        seen["messages"] = [await receive() for _ in range(n)]

    await InlineBody(app)(scope, receive, None)
    return seen["scope"], seen["messages"]


def test_a_body_in_chunks_is_inlined_whole_and_still_replayed_to_serve() -> None:
    async def run() -> None:
        parts = [{"type": "http.request", "body": b'{"a":', "more_body": True},
                 {"type": "http.request", "body": b' 1}', "more_body": False}]  # fmt: skip
        receive, gone = _client(*parts)
        gone.set()
        scope, messages = await _through_proxy(_scope([(b"content-length", b"8")]), receive, 3)
        assert scope[BODY_SCOPE_KEY] == b'{"a": 1}'
        assert messages == [*parts, DISCONNECT]  # Serve's own fetch sees what it always did
        pickle.loads(pickle.dumps(scope))  # the scope crosses to the replica pickled

    asyncio.run(run())


@pytest.mark.parametrize("headers", [
    [],  # no declared length (chunked transfer encoding)
    [(b"content-length", b"nan")],
    [(b"content-length", str(MAX_INLINE_BODY + 1).encode())],
])  # fmt: skip
def test_a_body_of_no_or_too_long_declared_length_takes_serves_path(headers: list) -> None:
    async def run() -> None:
        part = {"type": "http.request", "body": b"x", "more_body": False}
        receive, _ = _client(part)
        scope, messages = await _through_proxy(_scope(headers), receive, 1)
        assert BODY_SCOPE_KEY not in scope
        assert messages == [part]

    asyncio.run(run())


def test_a_client_gone_before_its_body_ends_takes_serves_path() -> None:
    async def run() -> None:
        part = {"type": "http.request", "body": b"{", "more_body": True}
        receive, _ = _client(part, DISCONNECT)
        scope, messages = await _through_proxy(_scope([(b"content-length", b"9")]), receive, 2)
        assert BODY_SCOPE_KEY not in scope
        assert messages == [part, DISCONNECT]

    asyncio.run(run())


async def _read_body_as_a_replica_does(request: Any) -> dict[str, Any]:
    """The replica's path (Serve's replica.py): an ASGIReceiveProxy over the request's
    ``receive_asgi_messages``, its fetch running as a task, then the app's first message."""
    from ray.serve._private.http_util import ASGIReceiveProxy

    receive = ASGIReceiveProxy(request.asgi_scope, None, request.receive_asgi_messages)
    fetch = asyncio.create_task(receive.fetch_until_disconnect())
    try:
        return await asyncio.wait_for(receive(), 5)
    finally:
        await asyncio.sleep(0)
        assert not fetch.done()  # nothing after the body: it waits until Serve cancels it
        fetch.cancel()


def test_an_inlined_body_is_read_without_a_call_to_the_proxy() -> None:
    """The proxy named here does not exist and no Ray runs: Serve's own property would look it
    up (ray.get_actor) and fail; with the body in the scope nothing is called."""
    from ray.serve._private.common import StreamingHTTPRequest

    assert skip_serves_body_fetch()
    assert skip_serves_body_fetch()  # once per process, however many replicas ask
    scope = {**_scope([]), BODY_SCOPE_KEY: b'{"prompt": "hi"}'}
    request = pickle.loads(pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="gone")))
    message = asyncio.run(_read_body_as_a_replica_does(request))
    assert message == {"type": "http.request", "body": b'{"prompt": "hi"}', "more_body": False}


def test_without_an_inlined_body_the_replica_fetches_from_the_proxy_as_serve_does() -> None:
    from ray.serve._private.common import StreamingHTTPRequest

    assert skip_serves_body_fetch()
    sent = {"type": "http.request", "body": b"{}", "more_body": False}
    calls: list[Any] = []

    async def fetch_from_proxy(metadata: Any) -> bytes:
        calls.append(metadata)
        return pickle.dumps([sent]) if len(calls) == 1 else await asyncio.Event().wait()

    request = StreamingHTTPRequest(_scope([]), receive_asgi_messages=fetch_from_proxy)
    assert asyncio.run(_read_body_as_a_replica_does(request)) == sent
    assert len(calls) >= 1

"""Registers ``segserve.v1.SegServe`` on a gRPC server: what Serve's ``grpc_servicer_functions``
names (``segserve.proto.servicer.add_SegServeServicer_to_server``).

It is the generated ``add_SegServeServicer_to_server`` with one change: a request whose bytes
are not a valid message (corrupt wire format, a string field that is not UTF-8) still reaches
the service, as an ``Undecodable``. The generated parser raises instead, and gRPC answers that
with UNKNOWN and the exception's class in the details; the service answers INVALID_ARGUMENT
naming the message type (deploy/grpc_api.py).

Serve calls it in its own gRPC servers (the proxy, a direct-ingress replica) with their server,
so it also mends one thing there: a client's cancel of a stream always reaches the replica call
(``_cancellable_streams``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Undecodable:
    """A request that did not parse; it crosses from Serve's proxy to the ingress pickled."""

    message_type: str  # the full protobuf name, e.g. segserve.v1.GenerateRequest
    reason: str  # the parser's words (no internals: which message, what was wrong)


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    from google.protobuf.message import DecodeError

    message_type = parse.__self__.DESCRIPTOR.full_name  # parse is Message.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            # "Error parsing message with type X: what" -> "what"
            return Undecodable(message_type, str(e).rsplit(": ", 1)[-1])

    return deserialize


def _with_lenient_parsing(handlers: dict[str, Any]) -> dict[str, Any]:
    return {name: h._replace(request_deserializer=_lenient(h.request_deserializer))
            for name, h in handlers.items()}  # fmt: skip


class _LenientServer:
    """The server, seen by the generated registration: its handlers parse leniently."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[Any]) -> None:
        for g in generic_handlers:  # grpc's generic handler keeps them by full method name
            g._method_handlers = _with_lenient_parsing(g._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:  # older grpcio has only the generic path
            add(service, _with_lenient_parsing(handlers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _EndedAware:
    """An RPC's context, for Serve's handler running in a task of its own (below): once the RPC
    has ended, calls on it do nothing (``peer()`` answers from a copy taken at the start).
    gRPC frees an ended call's state, and Serve's handler still reads the peer for its access
    log and sets the status: on a freed call that segfaults the proxy."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._peer = context.peer()
        self.ended = False

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._context, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return None if self.ended else attr(*args, **kwargs)

        return call


def _cancellable_streams(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Serve's handler factory, with server-streaming handlers that pass a client's cancel on.

    Serve 2.60's gRPC proxy cancels the replica call only when the cancel lands while it awaits
    the replica's next item; one that lands while an item is being written to the client (most
    of a stream's life) is swallowed, and the request runs to its end. Here Serve's handler runs
    in a task of its own that only ever awaits the replica, and the RPC's end (a cancel, a
    deadline, or done) cancels that task, so the cancel always lands where Serve passes it on."""
    if getattr(factory, "cancellable_streams", False):
        return factory

    def make(*, service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if getattr(streaming_type, "name", "") != "UNARY_STREAM":
            return handler

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            guarded = _EndedAware(context)
            # Unbounded, so the pump never waits to put: a cancel landing there would be lost
            # again. A slow reader's items (a stream's tokens) wait here, not in the replica.
            items: asyncio.Queue[Any] = asyncio.Queue()
            end = object()

            async def pump() -> None:
                try:
                    async for item in handler(request, guarded):
                        items.put_nowait(item)
                finally:
                    items.put_nowait(end)

            task = asyncio.ensure_future(pump())

            def ended(_: Any) -> None:
                guarded.ended = True
                task.cancel()  # a no-op once it is done

            context.add_done_callback(ended)
            try:
                while (item := await items.get()) is not end:
                    yield item
                await task  # its error, if it failed
            finally:
                # A cancel that lands while gRPC writes an item closes this generator later,
                # from the event loop; the done callback has cancelled the pump by then.
                task.cancel()

        return unary_stream

    make.cancellable_streams = True  # type: ignore[attr-defined]
    return make


def add_SegServeServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    from . import segserve_pb2_grpc

    if hasattr(server, "service_handler_factory"):  # Serve's proxy (or direct-ingress) server
        server.service_handler_factory = _cancellable_streams(server.service_handler_factory)
    segserve_pb2_grpc.add_SegServeServicer_to_server(servicer, _LenientServer(server))

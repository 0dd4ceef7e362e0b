"""Registers ``segserve.v1.SegServe`` on a gRPC server: what Serve's ``grpc_servicer_functions``
names (``segserve.proto.servicer.add_SegServeServicer_to_server``).

It is the generated ``add_SegServeServicer_to_server`` with one change: a request whose bytes
are not a valid message (corrupt wire format, a string field that is not UTF-8) still reaches
the service, as an ``Undecodable``. The generated parser raises instead, and gRPC answers that
with UNKNOWN and the exception's class in the details; the service answers INVALID_ARGUMENT
naming the message type (deploy/grpc_api.py).

Serve calls it in its own gRPC servers (the proxy, a direct-ingress replica) with their server,
so it also mends two things there (``_mend_serve_handlers``): a client's cancel of a stream
always reaches the replica call, and Serve's own errors carry no internals.
"""

from __future__ import annotations

import asyncio
import uuid
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


def replica_gone(request_id: str) -> str:
    """What a client is told when the replica holding its request died (HTTP 503, gRPC
    UNAVAILABLE): retry. Here, the lowest layer that says it (deploy imports proto)."""
    return f"the replica serving this request became unavailable; retry (request id {request_id})"


def opaque_internal(request_id: str) -> str:
    """What a client is told of a failure whose cause stays in the log (HTTP 500, gRPC
    INTERNAL): only the request id to quote."""
    return f"internal error (request id {request_id})"


class _ServeContext:
    """An RPC's context as Serve's handler sees it, with two mends.

    Serve's own error status for a failed call to the ingress replica (INTERNAL, its details
    ``str()`` of Ray's exception: actor id, pid, node address) becomes the service's: for a
    replica that died, UNAVAILABLE (retry) naming the request id, otherwise INTERNAL naming it;
    Serve's log has the exception under that id. The ingress's own statuses name their request
    or error id already and pass as they are. So that there is an id to name, a call without a
    ``request_id`` in its metadata gets one here, which Serve then uses.

    Once the RPC has ended, calls on the context do nothing (``peer()`` answers from a copy taken
    at the start): gRPC frees an ended call's state, and Serve's streaming handler, run in a task
    of its own (``_mend_serve_handlers``), still reads the peer for its access log and sets the
    status after a cancel; on a freed call that segfaults the proxy."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._peer = context.peer()
        metadata = tuple(context.invocation_metadata() or ())
        ids = [v for k, v in metadata if k == "request_id"]
        self.request_id = ids[0] if ids else uuid.uuid4().hex
        self._metadata = metadata if ids else (*metadata, ("request_id", self.request_id))
        self._code: Any = None
        self.ended = False

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def set_code(self, code: Any) -> None:
        self._code = code
        if not self.ended:
            self._context.set_code(code)

    def set_details(self, details: str) -> None:
        import grpc

        details = details or ""
        # Ours are one line naming an id; Ray's exceptions span lines (and may quote ours).
        ours = "\n" not in details and ("(request id " in details or "(error id " in details)
        if self._code == grpc.StatusCode.INTERNAL and not ours:
            if "actor" in details.lower():  # RayActorError, ActorUnavailableError
                self.set_code(grpc.StatusCode.UNAVAILABLE)
                details = replica_gone(self.request_id)
            else:
                details = opaque_internal(self.request_id)
        if not self.ended:
            self._context.set_details(details)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._context, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return None if self.ended else attr(*args, **kwargs)

        return call


def _mend_serve_handlers(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Serve's handler factory, with handlers that see a ``_ServeContext``, and server-streaming
    handlers that pass a client's cancel on.

    Serve 2.60's gRPC proxy cancels the replica call only when the cancel lands while it awaits
    the replica's next item; one that lands while an item is being written to the client (most
    of a stream's life) is swallowed, and the request runs to its end. Here Serve's handler runs
    in a task of its own that only ever awaits the replica, and the RPC's end (a cancel, a
    deadline, or done) cancels that task, so the cancel always lands where Serve passes it on."""
    if getattr(factory, "mended", False):
        return factory

    def make(*, service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        kind = getattr(streaming_type, "name", "")
        if kind == "UNARY_UNARY":

            async def unary_unary(request: Any, context: Any) -> Any:
                return await handler(request, _ServeContext(context))

            return unary_unary
        if kind != "UNARY_STREAM":  # client streams: our service has none
            return handler

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            guarded = _ServeContext(context)
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

    make.mended = True  # type: ignore[attr-defined]
    return make


def add_SegServeServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    from . import segserve_pb2_grpc

    if hasattr(server, "service_handler_factory"):  # Serve's proxy (or direct-ingress) server
        server.service_handler_factory = _mend_serve_handlers(server.service_handler_factory)
    segserve_pb2_grpc.add_SegServeServicer_to_server(servicer, _LenientServer(server))

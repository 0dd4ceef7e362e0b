"""Registers ``segserve.v1.SegServe`` on a gRPC server: what Serve's ``grpc_servicer_functions``
names (``segserve.proto.servicer.add_SegServeServicer_to_server``).

It is the generated ``add_SegServeServicer_to_server`` with one change: a request whose bytes
are not a valid message (corrupt wire format, a string field that is not UTF-8) still reaches
the service, as an ``Undecodable``. The generated parser raises instead, and gRPC answers that
with UNKNOWN and the exception's class in the details; the service answers INVALID_ARGUMENT
naming the message type (deploy/grpc_api.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def add_SegServeServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    from . import segserve_pb2_grpc

    segserve_pb2_grpc.add_SegServeServicer_to_server(servicer, _LenientServer(server))

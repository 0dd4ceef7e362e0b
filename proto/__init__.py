"""segserve's gRPC API: ``segserve.proto`` (the .proto), its generated stubs
(``segserve_pb2``, ``segserve_pb2_grpc``; regenerate with ``python -m segserve.proto.generate``)
and ``SegServeClient``.

Nothing is imported here eagerly: grpc and protobuf load only when the client or the stubs are
used, so importing ``segserve.proto`` costs nothing for code that never speaks gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import SegServeClient

__all__ = ["SegServeClient"]


def __getattr__(name: str) -> Any:
    if name == "SegServeClient":
        from .client import SegServeClient

        return SegServeClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

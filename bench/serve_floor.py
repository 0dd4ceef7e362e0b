"""Serve's own floor, for ``bench/serve.py --serve-floor``: what Serve costs with no segserve code.

Two no-op deployments, ``FloorIngress`` (HTTP, FastAPI) and ``FloorHop`` behind it, measured
through the same Serve mode and addresses as the service: ``/local`` answers at once, ``/hop``
first calls FloorHop once over a streaming handle (as the ingress calls the engine replica).
The difference to the engine alone that Serve cannot go below is about ``/hop``'s latency, and
``/hop`` - ``/local`` is what one deployment hop costs. Over gRPC (Serve's gRPC proxy, the
service's servicer) the same pair answers ``Health`` at once and ``ListModels`` after the hop.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from ray import serve
from segserve.proto import segserve_pb2

APP = "serve-floor"
PREFIX = "/floor"
floor_api = FastAPI()


@serve.deployment
class FloorHop:
    async def generate(self, x: int) -> Any:
        yield x


@serve.deployment
@serve.ingress(floor_api)
class FloorIngress:
    def __init__(self, hop: Any) -> None:
        from segserve.deploy.launch import serve_uses_grpc

        # The transport of this replica's serve mode, as the service's ingress picks it: a
        # handle otherwise keeps the driver's, which is the first mode's when a bench runs several.
        self.hop = hop.options(stream=True, _by_reference=not serve_uses_grpc())

    @floor_api.get("/local")
    async def local(self) -> dict[str, int]:
        return {"x": 1}

    @floor_api.get("/hop")
    async def hop(self) -> dict[str, list[int]]:
        return {"x": [x async for x in self.hop.generate.remote(1)]}

    # gRPC, through the service's servicer (the proxy calls the app's ingress by method name)
    async def Health(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return segserve_pb2.HealthResponse(status="ok")

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        [_ async for _ in self.hop.generate.remote(1)]
        return segserve_pb2.ListModelsResponse()


def deploy() -> None:
    """Deploy the pair on the running Serve (the workers import this module's classes by value:
    bench/ is not on their path)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    serve.run(FloorIngress.bind(FloorHop.bind()), name=APP, route_prefix=PREFIX)


async def _median_ms(call: Callable[[], Awaitable[Any]], n: int, warmup: int) -> float:
    """Median latency (ms) of ``n`` sequential awaits of ``call()``, after ``warmup`` more."""
    times = []
    for i in range(warmup + n):
        start = time.perf_counter()
        await call()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


async def measure(session: Any, base: str, n: int = 200, warmup: int = 20) -> dict[str, float]:
    """Median latency (ms) of ``n`` sequential GETs of each route at ``base`` (the app's URL)."""

    def get(route: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            async with session.get(f"{base}/{route}") as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"serve floor /{route}: HTTP {resp.status}")

        return call

    out = {f"{route}_ms": await _median_ms(get(route), n, warmup) for route in ("local", "hop")}
    out["hop_cost_ms"] = out["hop_ms"] - out["local_ms"]
    return out


async def measure_grpc(target: str, n: int = 200, warmup: int = 20) -> dict[str, float]:
    """As ``measure``, over gRPC at ``target`` (host:port of the proxy or the replica)."""
    import grpc
    from segserve.proto import segserve_pb2_grpc

    metadata = (("application", APP),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = segserve_pb2_grpc.SegServeStub(channel)

        def rpc(method: Any, request: Any) -> Callable[[], Awaitable[Any]]:
            return lambda: method(request, metadata=metadata, timeout=30)

        local = rpc(stub.Health, segserve_pb2.HealthRequest())
        hop = rpc(stub.ListModels, segserve_pb2.ListModelsRequest())
        out = {"grpc_local_ms": await _median_ms(local, n, warmup),
               "grpc_hop_ms": await _median_ms(hop, n, warmup)}  # fmt: skip
    out["grpc_hop_cost_ms"] = out["grpc_hop_ms"] - out["grpc_local_ms"]
    return out

"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and gRPC on one Serve deployment.

The routes and methods here are thin: the service core (service.py) validates and streams, the
HTTP endpoints share one path (openai_api.py), and the gRPC methods live in grpc_api.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations
# at runtime, and Serve's class-based ingress rebinds the methods where string annotations
# no longer resolve.
from collections.abc import AsyncIterator
from dataclasses import asdict
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from . import grpc_api, routing_view, utility_api
from .config import ServiceConfig, engine_config
from .errors import APIError, internal_error
from .local_handle import LocalReplicaHandle, LocalRoutingView
from .openai_api import CHAT_COMPLETIONS, COMPLETIONS, read_body, serve_openai
from .openapi import openapi_schema, set_served_models
from .proxy_middleware import skip_serves_body_fetch
from .replica import LLMReplica
from .router import deployment_name
from .service import ServiceCore, validation_error

api = FastAPI(title="segserve", description="OpenAI-compatible LLM serving on Ray Serve")
api.openapi = partial(openapi_schema, api)  # the bodies and errors the routes really have


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def allowed_methods(request: Request) -> str:
    """A 405's Allow (RFC 9110 requires it): every method some route on the request's path
    takes. Starlette names only the first route's, and GET and HEAD are two routes here."""
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    return ", ".join(m for m in methods if any(
        route.matches({**request.scope, "method": m})[0] == Match.FULL
        for route in request.app.router.routes))  # fmt: skip


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    headers = e.headers
    if e.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                        headers=headers)


@api.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    # A bug: the documented 500 with an OpenAI body, its cause in the log under the id it names
    err = internal_error(e, "HTTP request")
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(e)
    return JSONResponse(err.body(), status_code=err.status)


# Serve pickles the FastAPI app when the class is decorated, with the module globals its
# routes use at that moment: everything they call must be defined (or imported) above.
@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP routes below; gRPC methods (named as in proto/segserve.proto) further down. With
    ``ingress.engine_in_ingress`` the engine runs in this replica too (local_handle.py), which
    then answers Serve's routing, autoscaling and health calls for it."""

    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        context = serve.get_replica_context()
        cfg = ServiceConfig.model_validate(config)
        skip_serves_body_fetch()  # the body our proxy middleware inlined: no call back for it
        self.replica: LLMReplica | None = None
        if cfg.ingress.engine_in_ingress:
            model, pool = cfg.single_pool()
            name = deployment_name(model.name, pool.name)
            self.replica = LLMReplica(asdict(engine_config(model, pool)), model.name, pool.name,
                                      pool.uses_engine_process)
            handles = {name: LocalReplicaHandle(self.replica)}
            routing_view.ROUTERS[context.app_name, name] = LocalRoutingView(
                self.replica, context.replica_id.unique_id)
        self.core = ServiceCore(cfg, handles, context.app_name)
        # /openapi.json names the models and their token-id ranges
        set_served_models({name: m.vocab_size for name, m in self.core.models.items()})

    # ----- the engine's, when it runs here (Serve calls these) ------------------------------
    def record_routing_stats(self) -> dict[str, float]:
        return self.replica.record_routing_stats() if self.replica is not None else {}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.replica.record_autoscaling_stats() if self.replica is not None else {}

    async def check_health(self) -> None:
        if self.replica is not None:
            await self.replica.check_health()

    # ----- HTTP -----------------------------------------------------------------------------
    # Each GET route answers HEAD too (RFC 9110 asks it of a server with GET; uptime checks
    # send it), outside the schema, which lists each operation once.
    @api.get("/health")
    @api.head("/health", include_in_schema=False)
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    @api.head("/v1/models", include_in_schema=False)
    async def models(self, request: Request) -> dict[str, Any]:
        self.core.authorize(request.headers.get("authorization"))
        return utility_api.list_models(self.core)

    @api.get("/v1/models/{model_id:path}")  # ids may hold slashes (org/name)
    @api.head("/v1/models/{model_id:path}", include_in_schema=False)
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self.core.authorize(request.headers.get("authorization"))
        return utility_api.get_model(self.core, model_id)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        self.core.authorize(request.headers.get("authorization"))
        body = await read_body(request, self.core.config.ingress.max_body_bytes)
        return await utility_api.tokenize_off_loop(self.core, body)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        self.core.authorize(request.headers.get("authorization"))
        body = await read_body(request, self.core.config.ingress.max_body_bytes)
        return utility_api.detokenize(self.core, body)

    @api.get("/version")
    @api.head("/version", include_in_schema=False)
    async def version(self) -> dict[str, str]:
        return utility_api.version()

    @api.get("/metrics")
    @api.head("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        # Open like /health (as vLLM's): scrapers carry no API key.
        return Response(utility_api.metrics(self.core), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await serve_openai(self.core, COMPLETIONS, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await serve_openai(self.core, CHAT_COMPLETIONS, request)

    async def in_flight(self) -> dict[str, int]:
        """Requests this ingress has sent to each replica deployment and not finished (a
        handle call, not a route: the tests and bench/fuzz.py check that they go back to 0)."""
        return {s.deployment: s.in_flight for s in self.core.router.all_states()}

    # ----- gRPC (Ray Serve's gRPC proxy calls these by method name) -------------------------
    async def Health(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_api.health(self.core, request, grpc_context)

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_api.list_models(self.core, request, grpc_context)

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_api.generate(self.core, request, grpc_context)

    async def GenerateStream(  # noqa: N802
        self, request: Any, grpc_context: Any = None
    ) -> AsyncIterator[Any]:
        async for response in grpc_api.generate_stream(self.core, request, grpc_context):
            yield response

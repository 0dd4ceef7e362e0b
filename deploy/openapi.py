"""The OpenAPI schema the ingress serves at /openapi.json, made truthful.

The routes read their bodies themselves (``request.body()``: one parse path for HTTP and the
errors it names), so FastAPI sees no body parameters and would document none, and would promise
its own 422 for bad input where the service answers 400. This fills in what the service really
takes and returns: each POST's request body (protocol.py's models), the error statuses each
route can answer with an OpenAI error body, SSE for streamed completions, Prometheus text for
/metrics, and the served model names. Fuzzers (bench/fuzz.py, schemathesis) read it to know
what a valid request is.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .errors import APIError
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"

# The statuses each route can answer with besides 200: 401 wherever an API key may be asked
# for, 404 for a model not served, 413/415 for a body too large or compressed
# (openai_api.read_body), and the generation path's overload, replica and deadline failures
# (errors.APIError.TYPES).
_GENERATE = (400, 401, 404, 413, 415, 429, 500, 503, 504)
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/v1/models"): (401,),
    ("get", "/v1/models/{model_id}"): (401, 404),
    ("post", "/tokenize"): (400, 401, 404, 413, 415),
    ("post", "/detokenize"): (400, 401, 404, 413, 415),
    ("post", "/v1/completions"): _GENERATE,
    ("post", "/v1/chat/completions"): _GENERATE,
}
BODIES: dict[str, list[type[BaseModel]]] = {
    "/v1/completions": [CompletionRequest],
    "/v1/chat/completions": [ChatCompletionRequest],
    "/tokenize": [TokenizeRequest, TokenizeChatRequest],  # a prompt, or chat messages
    "/detokenize": [DetokenizeRequest],
}
STREAMED = ("/v1/completions", "/v1/chat/completions")

ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": "integer"},
        },
    }},
}  # fmt: skip

# Fields whose token ids must lie in the vocabulary, and fields that must not be empty (the
# service refuses those with a 400 that pydantic's types alone do not express). /tokenize
# takes a chat request's sampling fields but ignores them: they are not checked there.
TOKEN_ID_FIELDS = {"CompletionRequest": ("prompt", "allowed_token_ids"),
                   "ChatCompletionRequest": ("allowed_token_ids",),
                   "DetokenizeRequest": ("tokens",)}  # fmt: skip
NON_EMPTY_FIELDS = {"CompletionRequest": ("prompt",), "ChatCompletionRequest": ("messages",),
                    "TokenizeChatRequest": ("messages",)}  # fmt: skip
# One server-sent event (OpenAPI before 3.2: a text/event-stream schema describes each event):
# its data is a JSON chunk, an error body (an error after the stream began), or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}

_served: dict[str, int] = {}  # model name -> its vocabulary size


def set_served_models(vocab_sizes: dict[str, int]) -> None:
    """The models this process's ingress serves, with their vocabulary sizes (a request's
    ``model`` is one of them). Each Serve replica is its own process with one ingress, so a
    module value is enough."""
    _served.clear()
    _served.update(vocab_sizes)


def _null_means_default(schema: dict[str, Any]) -> None:
    """protocol._Schema takes ``null`` for any optional field (its default): say so."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _allows_null(prop):
            continue
        default = {"default": prop.pop("default")} if "default" in prop else {}
        title = {"title": prop.pop("title")} if "title" in prop else {}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **default, **title}


def _allows_null(prop: dict[str, Any]) -> bool:
    if prop.get("type") == "null" or prop == {}:
        return True
    return any(_allows_null(p) for p in prop.get("anyOf", ()))


def _bound(schema: dict[str, Any], non_empty: bool, max_token_id: int | None) -> None:
    """Every string and array in ``schema`` (a field's) non-empty, every integer a token id."""
    kind = schema.get("type")
    if non_empty and kind == "string":
        schema["minLength"] = max(1, schema.get("minLength", 0))
    if non_empty and kind == "array":
        schema["minItems"] = max(1, schema.get("minItems", 0))
    if kind == "integer" and max_token_id is not None:
        schema.update(minimum=0, maximum=max_token_id)
    for sub in [*schema.get("anyOf", ()), *([schema["items"]] if "items" in schema else [])]:
        _bound(sub, non_empty, max_token_id)


def _model_schemas(models: list[type[BaseModel]], components: dict[str, Any]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            _null_means_default(sub)
            components[name] = sub
        props = schema.get("properties", {})
        if "model" in props and _served:
            props["model"]["enum"] = sorted(_served)
        # A token id outside every served vocabulary is always refused.
        max_id = max(_served.values()) - 1 if _served else None
        ids, non_empty = (f.get(model.__name__, ()) for f in (TOKEN_ID_FIELDS, NON_EMPTY_FIELDS))
        for field in set(ids) | set(non_empty):
            _bound(props[field], field in non_empty, max_id if field in ids else None)


def _request_body(path: str) -> dict[str, Any]:
    refs = [{"$ref": REF.format(model=m.__name__)} for m in BODIES[path]]
    schema: dict[str, Any] = refs[0] if len(refs) == 1 else {"anyOf": refs}
    if path == "/tokenize":  # the body holding "messages" is the chat form (utility_api.py)
        schema = {"anyOf": [{"allOf": [refs[0], {"not": {"required": ["messages"]}}]},
                            refs[1]]}  # fmt: skip
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _error_response(status: int) -> dict[str, Any]:
    kind = APIError.TYPES.get(status, "error")
    return {"description": kind.replace("_", " "),
            "content": {"application/json": {"schema": {"$ref": REF.format(
                model="ErrorResponse")}}}}  # fmt: skip


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of ``app`` with the request bodies, error responses and media types
    the service really has. Cached on the app, as FastAPI's own is."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = copy.deepcopy(get_openapi(title=app.title, version=app.version,
                                       description=app.description, routes=app.routes))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # never sent: bad input is a 400
        components.pop(name, None)
    components["ErrorResponse"] = ERROR_BODY
    _model_schemas([m for models in BODIES.values() for m in models], components)
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            responses.pop("422", None)
            for status in ERRORS.get((method, path), ()):
                responses[str(status)] = _error_response(status)
            if path in BODIES:
                op["requestBody"] = _request_body(path)
            if path in STREAMED:  # "stream": true answers with server-sent events
                responses["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    app.openapi_schema = schema
    return schema

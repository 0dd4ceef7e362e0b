"""The OpenAI-compatible endpoints' one shared path: parse, prepare, stream or collect, render.

``/v1/completions`` and ``/v1/chat/completions`` differ only in their request schema, how the
request becomes a ``Prepared`` one, and their ``ResponseShape``; everything else is here once.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, _Request
from .responses import (
    CHAT,
    COMPLETION,
    ChoiceRenderer,
    RenderContext,
    ResponseShape,
    new_id,
    usage_body,
)
from .service import Prepared, ServiceCore, validation_error


@dataclass(frozen=True)
class Endpoint:
    schema: type[_Request]
    shape: ResponseShape
    # The request as the service core's prepare() arguments (prompt or messages).
    prepare: Callable[[ServiceCore, Any], Prepared]
    want_logprobs: Callable[[Any], bool]


def _prepare_completion(core: ServiceCore, body: CompletionRequest) -> Prepared:
    return core.prepare(body.model, body.sampling(), prompt=body.single_prompt(),
                        device=body.device)  # fmt: skip


def _prepare_chat(core: ServiceCore, body: ChatCompletionRequest) -> Prepared:
    return core.prepare(body.model, body.sampling(), messages=body.template_messages(),
                        device=body.device)  # fmt: skip


COMPLETIONS = Endpoint(CompletionRequest, COMPLETION, _prepare_completion,
                       lambda body: body.logprobs is not None)  # fmt: skip
CHAT_COMPLETIONS = Endpoint(ChatCompletionRequest, CHAT, _prepare_chat,
                            lambda body: bool(body.logprobs))  # fmt: skip


async def parse(request: Request, schema: type[_Request]) -> Any:
    raw = await request.body()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from e


async def serve_openai(core: ServiceCore, endpoint: Endpoint, request: Request) -> Any:
    """One completions or chat request: a JSON body, or an SSE stream of chunks."""
    core.authorize(request.headers.get("authorization"))
    body = await parse(request, endpoint.schema)
    prep = endpoint.prepare(core, body)
    stream = await core.open_stream(prep)
    rid = new_id(endpoint.shape.id_prefix)
    ctx = RenderContext(body.model, endpoint.want_logprobs(body),
                        lambda wire: core.logprob_entries(body.model, wire))  # fmt: skip
    if body.stream:
        events = _events(endpoint.shape, ctx, prep, stream, rid, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    choices: dict[int, ChoiceRenderer] = {}
    async for item in stream:
        _choice(choices, endpoint.shape, ctx, item["index"]).feed(item)
    bodies = [choices[i].body() for i in sorted(choices)]
    usage = _usage(prep, sum(len(c.state.token_ids) for c in choices.values()))
    return endpoint.shape.body(rid, body.model, bodies, usage)


def _choice(choices: dict[int, ChoiceRenderer], shape: ResponseShape, ctx: RenderContext,
            index: int) -> ChoiceRenderer:  # fmt: skip
    c = choices.get(index)
    if c is None:
        c = choices[index] = shape.choice(index, ctx)
    return c


async def _events(
    shape: ResponseShape, ctx: RenderContext, prep: Prepared, stream: AsyncIterator[dict],
    rid: str, include_usage: bool,
) -> AsyncIterator[str]:  # fmt: skip
    created, completion_tokens = int(time.time()), 0
    choices: dict[int, ChoiceRenderer] = {}
    try:
        async for item in stream:
            completion_tokens += len(item["token_ids"])
            for entry in _choice(choices, shape, ctx, item["index"]).feed(item):
                yield _sse(shape.chunk(rid, ctx.model, created, [entry]))
        if include_usage:
            yield _sse(shape.chunk(rid, ctx.model, created, [], _usage(prep, completion_tokens)))
    except APIError as e:
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


def _usage(prep: Prepared, completion_tokens: int) -> dict[str, Any]:
    return usage_body(len(prep.prompt_ids), completion_tokens, prep.cached_tokens)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

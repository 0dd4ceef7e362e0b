"""The OpenAI-compatible endpoints' one shared path: parse, prepare, stream or collect, render.

``/v1/completions`` and ``/v1/chat/completions`` differ only in their request schema, how the
request becomes a ``Prepared`` one (and what it echoes), and their ``ResponseShape``; everything
else is here once.
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

from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest, _Request
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
    # The text every choice starts with (echo), given the prepared request.
    echo: Callable[[ServiceCore, Any, Prepared], str]
    want_logprobs: Callable[[Any], bool]


def _prepare_completion(core: ServiceCore, body: CompletionRequest) -> Prepared:
    return core.prepare(
        body.model, body.sampling(), prompt=body.single_prompt(), device=body.device,
        add_special_tokens=body.add_special_tokens,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
    )  # fmt: skip


def _echo_completion(core: ServiceCore, body: CompletionRequest, prep: Prepared) -> str:
    if not body.echo:
        return ""
    if prep.prompt_text is not None:
        return prep.prompt_text
    skip = True if body.skip_special_tokens is None else body.skip_special_tokens
    return core.decode(body.model, prep.prompt_ids, skip)


def _prepare_chat(core: ServiceCore, body: ChatCompletionRequest) -> Prepared:
    return core.prepare(
        body.model, body.sampling(), messages=body.template_messages(),
        template_kwargs=body.template_kwargs(), add_special_tokens=body.add_special_tokens,
        truncate_prompt_tokens=body.truncate_prompt_tokens, device=body.device,
    )  # fmt: skip


COMPLETIONS = Endpoint(CompletionRequest, COMPLETION, _prepare_completion, _echo_completion,
                       lambda body: body.logprobs is not None)  # fmt: skip
CHAT_COMPLETIONS = Endpoint(ChatCompletionRequest, CHAT, _prepare_chat,
                            lambda core, body, prep: body.echo_prefix(),
                            lambda body: bool(body.logprobs))  # fmt: skip


async def parse(request: Request, schema: type[_Request]) -> Any:
    raw = await request.body()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from e


class _Response:
    """One request's choices as the replica stream fills them in."""

    def __init__(self, core: ServiceCore, endpoint: Endpoint, body: Any, prep: Prepared) -> None:
        self.shape = endpoint.shape
        self.body = body
        self.prep = prep
        self.rid = new_id(endpoint.shape.id_prefix)
        self.ctx = RenderContext(
            body.model, endpoint.want_logprobs(body),
            lambda wire: core.logprob_entries(body.model, wire, body.return_tokens_as_token_ids),
        )  # fmt: skip
        self.prefix = endpoint.echo(core, body, prep)
        self.keep = body.returned_choices  # beam search: the best n of the beams
        self.choices: dict[int, ChoiceRenderer] = {}
        self.completion_tokens = 0

    def feed(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The item's stream chunk entries ([] for a choice the response drops)."""
        index = item["index"]
        if self.keep is not None and index >= self.keep:
            return []
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = self.shape.choice(index, self.ctx, self.prefix)
        self.completion_tokens += len(item["token_ids"])
        return choice.feed(item)

    def usage(self) -> dict[str, Any]:
        p = self.prep
        return usage_body(len(p.prompt_ids), self.completion_tokens, p.cached_tokens)

    def body_json(self) -> dict[str, Any]:
        bodies = [self.choices[i].body() for i in sorted(self.choices)]
        return self.shape.body(self.rid, self.body.model, bodies, self.usage())

    async def events(self, stream: AsyncIterator[dict]) -> AsyncIterator[str]:
        created, model = int(time.time()), self.body.model
        continuous = self.body.continuous_usage
        try:
            async for item in stream:
                for entry in self.feed(item):
                    usage = self.usage() if continuous else None
                    yield _sse(self.shape.chunk(self.rid, model, created, [entry], usage))
            if self.body.include_usage:
                yield _sse(self.shape.chunk(self.rid, model, created, [], self.usage()))
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


async def serve_openai(core: ServiceCore, endpoint: Endpoint, request: Request) -> Any:
    """One completions or chat request: a JSON body, or an SSE stream of chunks."""
    core.authorize(request.headers.get("authorization"))
    body = await parse(request, endpoint.schema)
    prep = endpoint.prepare(core, body)
    response = _Response(core, endpoint, body, prep)
    stream = await core.open_stream(prep)
    if body.stream:
        return StreamingResponse(response.events(stream), media_type="text/event-stream")
    async for item in stream:
        response.feed(item)
    return response.body_json()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

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
    prompt_logprobs_body,
    usage_body,
)
from .service import Prepared, ServiceCore, validation_error
from .streams import MergedStream


@dataclass(frozen=True)
class Endpoint:
    schema: type[_Request]
    shape: ResponseShape
    # The request as prepared prompts (the service core's prepare(), once per prompt).
    prepare: Callable[[ServiceCore, Any], list[Prepared]]
    # How much prompt text preparing it tokenizes (ServiceCore.prepare_off_loop)
    text_chars: Callable[[Any], int]
    # The text every choice of a prompt starts with (echo), given that prompt prepared.
    echo: Callable[[ServiceCore, Any, Prepared], str]
    want_logprobs: Callable[[Any], bool]


def _prepare_completion(core: ServiceCore, body: CompletionRequest) -> list[Prepared]:
    sampling = body.sampling()
    return [
        core.prepare(
            body.model, sampling, prompt=prompt, device=body.device,
            add_special_tokens=body.add_special_tokens,
            truncate_prompt_tokens=body.truncate_prompt_tokens,
        )
        for prompt in body.prompts()
    ]  # fmt: skip


def _echo_completion(core: ServiceCore, body: CompletionRequest, prep: Prepared) -> str:
    if not body.echo:
        return ""
    if prep.prompt_text is not None:
        return prep.prompt_text
    skip = True if body.skip_special_tokens is None else body.skip_special_tokens
    return core.decode(body.model, prep.prompt_ids, skip)


def _prepare_chat(core: ServiceCore, body: ChatCompletionRequest) -> list[Prepared]:
    return [core.prepare(
        body.model, body.sampling(), messages=body.template_messages(),
        template_kwargs=body.template_kwargs(), add_special_tokens=body.add_special_tokens,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
        parse_tool_calls=body.parses_tool_calls, forced_tool=body.forced_tool,
        device=body.device,
    )]  # fmt: skip


def _completion_text(body: CompletionRequest) -> int:
    return sum(len(p) for p in body.prompts() if isinstance(p, str))


COMPLETIONS = Endpoint(CompletionRequest, COMPLETION, _prepare_completion, _completion_text,
                       _echo_completion, lambda body: body.logprobs is not None)  # fmt: skip
CHAT_COMPLETIONS = Endpoint(ChatCompletionRequest, CHAT, _prepare_chat, lambda _: 0,
                            lambda core, body, prep: body.echo_prefix(),
                            lambda body: bool(body.logprobs))  # fmt: skip


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body as sent, refused (413) once past ``max_bytes``, before it is all in
    memory: a body's size bounds nothing else before it is parsed. Compressed bodies are refused
    by name (415) rather than parsed as JSON."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the "
                       "body uncompressed")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_bytes} bytes "
                    "(ingress.max_body_bytes)")  # fmt: skip


async def parse(request: Request, schema: type[_Request], max_bytes: int) -> Any:
    raw = await read_body(request, max_bytes)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from e


class _Response:
    """One request's choices as the replica streams fill them in. With a batch of prompts,
    prompt i's choices are indexed i * choices_per_prompt + j, as OpenAI does."""

    def __init__(self, core: ServiceCore, endpoint: Endpoint, body: Any,
                 preps: list[Prepared]) -> None:  # fmt: skip
        self.shape = endpoint.shape
        self.body = body
        self.preps = preps
        self.rid = new_id(endpoint.shape.id_prefix)
        self.ctx = RenderContext(
            body.model, endpoint.want_logprobs(body),
            lambda wire: core.logprob_entries(body.model, wire, body.return_tokens_as_token_ids),
            parallel_tool_calls=getattr(body, "parallel_tool_calls", True),
        )  # fmt: skip
        self.prefixes = [endpoint.echo(core, body, p) for p in preps]
        self.per_prompt = body.choices_per_prompt
        self.choices: dict[tuple[int, int], ChoiceRenderer] = {}  # (prompt, engine index)
        self.core = core
        # echo with logprobs (completions): the prompt's tokens lead each choice's log-probs
        self.echo_logprobs = bool(getattr(body, "echo", False)) and endpoint.want_logprobs(body)
        self.prompt_logprobs: dict[int, list[dict[str, Any]]] = {}  # prompt -> its entries

    def _prompt_entries(self, pos: int, item: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Prompt ``pos``'s log-prob entries from the first item that carries them."""
        if pos not in self.prompt_logprobs and "prompt_logprobs" in item:
            self.prompt_logprobs[pos] = self.ctx.logprob_entries(item["prompt_logprobs"])
        return self.prompt_logprobs.get(pos)

    def _new_choice(self, pos: int, index: int, item: dict[str, Any]) -> ChoiceRenderer:
        choice = self.shape.choice(pos * self.per_prompt + index, self.ctx, self.prefixes[pos],
                                   self.preps[pos].tool_parser)  # fmt: skip
        entries = self._prompt_entries(pos, item)
        if entries is None:
            return choice
        if self.body.prompt_logprobs is not None:
            choice.prompt_logprobs = prompt_logprobs_body(entries)
        if self.echo_logprobs:
            first = self.ctx.logprob_entries([(self.preps[pos].prompt_ids[0], None, [])])[0]
            choice.echo_entries = [{**first, "top": None}] + entries
        return choice

    def feed(self, pos: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Prompt ``pos``'s item as stream chunk entries ([] for a choice the response drops:
        beam search keeps the first n beams, the best)."""
        index = item["index"]
        if not self.body.ranks_by_logprob and index >= self.per_prompt:
            return []
        choice = self.choices.get((pos, index))
        if choice is None:
            choice = self.choices[pos, index] = self._new_choice(pos, index, item)
        return choice.feed(item)

    def _kept(self) -> list[ChoiceRenderer]:
        if not self.body.ranks_by_logprob:
            return [self.choices[k] for k in sorted(self.choices)]
        kept = []
        for pos in range(len(self.preps)):  # best_of: the n most likely samples of each prompt
            mine = [c for (p, _), c in sorted(self.choices.items()) if p == pos]
            mine.sort(key=lambda c: c.state.cumulative_logprob, reverse=True)
            for rank, c in enumerate(mine[: self.per_prompt]):
                c.state.index = pos * self.per_prompt + rank
                kept.append(c)
        return kept

    def usage(self, choices: list[ChoiceRenderer] | None = None) -> dict[str, Any]:
        choices = list(self.choices.values()) if choices is None else choices
        return usage_body(
            sum(len(p.prompt_ids) for p in self.preps),
            sum(len(c.state.token_ids) for c in choices),
            sum(p.cached_tokens for p in self.preps),
        )

    def body_json(self) -> dict[str, Any]:
        kept = self._kept()
        bodies = [c.body() for c in kept]
        out = self.shape.body(self.rid, self.body.model, bodies, self.usage(kept))
        if self.shape is CHAT and self.body.prompt_logprobs is not None and self.prompt_logprobs:
            out["prompt_logprobs"] = prompt_logprobs_body(self.prompt_logprobs[0])  # vLLM's place
        return out

    async def events(self, stream: MergedStream) -> AsyncIterator[str]:
        created, model = int(time.time()), self.body.model
        continuous = self.body.continuous_usage
        try:
            async for pos, item in stream:
                for entry in self.feed(pos, item):
                    usage = self.usage() if continuous else None
                    yield _sse(self.shape.chunk(self.rid, model, created, [entry], usage))
            if self.body.include_usage:
                yield _sse(self.shape.chunk(self.rid, model, created, [], self.usage()))
        except APIError as e:
            yield _sse(e.body())
        finally:
            stream.close()
        yield "data: [DONE]\n\n"


async def serve_openai(core: ServiceCore, endpoint: Endpoint, request: Request) -> Any:
    """One completions or chat request: a JSON body, or an SSE stream of chunks."""
    key_salt = core.authorize(request.headers.get("authorization"))
    body = await parse(request, endpoint.schema, core.config.ingress.max_body_bytes)
    body.cache_salt = core.cache_salt(body.cache_salt, key_salt)
    try:
        preps = await core.prepare_off_loop(lambda: endpoint.prepare(core, body),
                                            endpoint.text_chars(body),
                                            chat=isinstance(body, ChatCompletionRequest))
        response = _Response(core, endpoint, body, preps)
        stream = await core.open_streams(preps)
    except APIError as e:
        if e.param == "structured":  # the engine's name: say which field the client sent
            e.param = body.structured_param
        raise
    if body.stream:
        return ClosingStreamingResponse(response.events(stream), stream.close,
                                        media_type="text/event-stream")  # fmt: skip
    replies = [response]  # a fresh one if the request must start again (feed_all)
    await core.feed_all(preps, stream, lambda pos, item: replies[-1].feed(pos, item),
                        lambda: replies.append(_Response(core, endpoint, body, preps)))
    return replies[-1].body_json()


class ClosingStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the response ends. A client that leaves before the body is
    iterated leaves the generator unstarted, so its own ``finally`` never runs: without this
    the replica call (and the pool's in-flight count) would live on."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

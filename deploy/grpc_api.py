"""The gRPC methods of ``segserve.v1.SegServe`` (proto/segserve.proto) on the service core.

Ray Serve's gRPC proxy calls the ingress's methods by name; they delegate here. Messages map to
the same ``prepare`` arguments as the HTTP API (chat messages and tools through the HTTP API's
own schema, so both accept and refuse the same things), and errors to the matching status codes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from .errors import APIError, internal_error
from .protocol import ChatCompletionRequest
from .responses import ChoiceState, ReplyReader, finish_reason
from .service import Prepared, ServiceCore, validation_error
from .tool_parsers import ToolCall

_SCALARS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "n", "logprobs", "beam_width",
    "length_penalty", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "min_tokens", "prompt_logprobs", "cache_salt",
)  # fmt: skip
_INPUTS = ("prompt", "prompt_token_ids", "prompts", "prompt_token_id_lists", "messages")


def _pb() -> Any:
    # Imported on first use: the stubs need grpcio, which the HTTP-only paths never touch.
    from ..proto import segserve_pb2

    return segserve_pb2


def sampling_kwargs(opts: Any) -> dict[str, Any]:
    """``SamplingOptions`` as SamplingParams kwargs: only the fields that are present."""
    out = {k: getattr(opts, k) for k in _SCALARS if opts.HasField(k)}
    if opts.stop:
        out["stop"] = list(opts.stop)
    if opts.stop_token_ids:
        out["stop_token_ids"] = list(opts.stop_token_ids)
    if opts.logit_bias:
        out["logit_bias"] = dict(opts.logit_bias)
    if opts.allowed_token_ids:
        out["allowed_token_ids"] = list(opts.allowed_token_ids)
    if opts.bad_words:
        out["bad_words"] = list(opts.bad_words)
    if opts.HasField("structured"):
        out["structured"] = _structured(opts.structured)
    if opts.HasField("early_stopping"):
        value = {"true": True, "false": False, "never": "never"}.get(opts.early_stopping)
        if value is None:
            raise APIError(400, "early_stopping must be 'true', 'false' or 'never'",
                           "early_stopping")  # fmt: skip
        out["early_stopping"] = value
    return out


def _structured(s: Any) -> dict[str, Any]:
    kind = s.WhichOneof("kind")
    if kind is None:
        raise APIError(400, "structured sets none of its kinds", "structured")
    if kind == "json_schema":
        return {"json": s.json_schema}  # JSON text: the engine parses it and names errors
    if kind == "choice":
        return {"choice": list(s.choice.values)}
    return {kind: getattr(s, kind)}


def check_decoded(request: Any) -> None:
    """A request whose bytes did not parse (proto/servicer.py) is the client's error."""
    from ..proto.servicer import Undecodable

    if isinstance(request, Undecodable):
        raise APIError(400, f"the request does not parse as a {request.message_type}: "
                       f"{request.reason}")  # fmt: skip


def authorization(grpc_context: Any) -> str | None:
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key.lower() == "authorization":
            return value
    return None


def fail(grpc_context: Any, e: APIError, response: Any) -> Any:
    """Set the status the client sees; return ``response`` (a unary method's reply)."""
    import grpc

    if grpc_context is not None:
        grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code_name))
        grpc_context.set_details(e.message)
    return response


# ----- requests ------------------------------------------------------------------------------
def _message(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type or "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]  # fmt: skip
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool(i: int, t: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": t.name}
    if t.description:
        function["description"] = t.description
    if t.parameters:
        try:
            function["parameters"] = json.loads(t.parameters)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise APIError(400, f"tool parameters are not JSON: {e}",
                           f"tools.{i}.parameters") from e  # fmt: skip
    return {"type": "function", "function": function}


def _chat(request: Any) -> ChatCompletionRequest:
    """The request's chat part, validated by the HTTP API's schema."""
    body: dict[str, Any] = {"model": request.model,
                            "messages": [_message(m) for m in request.messages]}  # fmt: skip
    if request.tools:
        body["tools"] = [_tool(i, t) for i, t in enumerate(request.tools)]
    if request.HasField("tool_choice"):
        which = request.tool_choice.WhichOneof("choice")
        function = request.tool_choice.function
        body["tool_choice"] = ({"type": "function", "function": {"name": function}}
                               if which == "function" else request.tool_choice.mode)  # fmt: skip
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e


def prepare(core: ServiceCore, request: Any, grpc_context: Any) -> list[Prepared]:
    """The request as prepared prompts: one, or a batch."""
    check_decoded(request)
    key_salt = core.authorize(authorization(grpc_context))
    given = [name for name in _INPUTS if len(getattr(request, name))]
    if len(given) != 1:
        raise APIError(400, f"set exactly one of {', '.join(_INPUTS)}", "prompt")
    if not request.model:
        raise APIError(400, "model is required", "model")
    if (request.tools or request.HasField("tool_choice")) and not request.messages:
        raise APIError(400, "tools go with messages", "tools")
    device = request.device or "auto"
    if device not in ("auto", "gpu", "cpu"):
        raise APIError(400, f"device must be auto, gpu or cpu, not {device!r}", "device")
    sampling = sampling_kwargs(request.sampling)
    salt = core.cache_salt(sampling.pop("cache_salt", None) or None, key_salt)
    if salt is not None:
        sampling["cache_salt"] = salt
    if request.messages:
        chat = _chat(request)
        forced = chat.tool_constraint()  # tool_choice required / named: calls only
        if forced is not None:
            if "structured" in sampling:
                raise APIError(400, "a required or named tool_choice constrains the reply to "
                               "tool calls; drop sampling.structured", "tool_choice")
            sampling["structured"] = forced
        return [core.prepare(
            request.model, sampling, messages=chat.template_messages(),
            template_kwargs=chat.template_kwargs(), parse_tool_calls=chat.parses_tool_calls,
            forced_tool=chat.forced_tool, device=device,
        )]  # fmt: skip
    prompts: list[str | list[int]] = (
        [request.prompt] if request.prompt
        else [list(request.prompt_token_ids)] if request.prompt_token_ids
        else list(request.prompts) if request.prompts
        else [list(p.ids) for p in request.prompt_token_id_lists]
    )  # fmt: skip
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(400, "prompt is empty", f"{given[0]}.{i}")
    return [core.prepare(request.model, sampling, prompt=p, device=device) for p in prompts]


def _per_prompt(prep: Prepared) -> int:
    """Choices of each prompt: prompt i's are indexed i * this + j."""
    beams = prep.sampling.get("beam_width", 1)
    return beams if beams > 1 else prep.sampling.get("n", 1)


def _parallel(request: Any) -> bool:
    return request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True


def _tool_calls(pb: Any, calls: list[ToolCall]) -> list[Any]:
    return [pb.ToolCall(id=c.id, type="function", name=c.name, arguments=c.arguments)
            for c in calls]  # fmt: skip


def _token_logprob(pb: Any, e: dict[str, Any]) -> Any:
    return pb.TokenLogprob(token_id=e["token_id"], token=e["token"], logprob=e["logprob"],
                           top=[pb.TopLogprob(**t) for t in e["top"]])


def _choice(pb: Any, c: ChoiceState, text: str, calls: list[ToolCall]) -> Any:
    """``text`` and ``calls``: the reply read by a ReplyReader (all text without tools)."""
    return pb.Choice(
        index=c.index, text=text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
        logprobs=[_token_logprob(pb, e) for e in c.logprobs],
        tool_calls=_tool_calls(pb, calls),
        prompt_logprobs=[_token_logprob(pb, e) for e in c.prompt_logprobs or []],
    )  # fmt: skip


def _usage(pb: Any, preps: list[Prepared], completion_tokens: int) -> Any:
    n = sum(len(p.prompt_ids) for p in preps)
    return pb.Usage(prompt_tokens=n, completion_tokens=completion_tokens,
                    total_tokens=n + completion_tokens,
                    cached_prompt_tokens=sum(p.cached_tokens for p in preps))  # fmt: skip


def _read(reader: ReplyReader, text: str, final: bool) -> tuple[str, list[ToolCall]]:
    events = reader.feed(text, final)
    return ("".join(e for e in events if isinstance(e, str)),
            [e for e in events if isinstance(e, ToolCall)])  # fmt: skip


# ----- methods -------------------------------------------------------------------------------
async def health(core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    try:
        check_decoded(request)
    except APIError as e:
        return fail(grpc_context, e, _pb().HealthResponse())
    return _pb().HealthResponse(status="ok")


async def list_models(core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    pb = _pb()
    try:
        check_decoded(request)
        core.authorize(authorization(grpc_context))
    except APIError as e:
        return fail(grpc_context, e, pb.ListModelsResponse())
    return pb.ListModelsResponse(
        models=[pb.ModelInfo(id=m["id"], pools=m["pools"], max_model_len=m["max_model_len"])
                for m in core.list_models()]  # fmt: skip
    )


async def generate(core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    pb = _pb()
    try:
        return await _generate(pb, core, request, grpc_context)
    except APIError as e:
        return fail(grpc_context, e, pb.GenerateResponse())
    except Exception as e:  # a bug: INTERNAL, not Serve's traceback (ids, addresses) as details
        return fail(grpc_context, internal_error(e, "gRPC Generate"), pb.GenerateResponse())


async def _prepare(core: ServiceCore, request: Any, grpc_context: Any) -> list[Prepared]:
    """``prepare``, off the event loop when there is much text or a chat template
    (ServiceCore.prepare_off_loop)."""
    check_decoded(request)  # bytes that did not parse have no fields to measure
    text = len(request.prompt) + sum(len(p) for p in request.prompts)
    return await core.prepare_off_loop(lambda: prepare(core, request, grpc_context), text,
                                       chat=bool(request.messages))  # fmt: skip


async def _generate(pb: Any, core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    preps = await _prepare(core, request, grpc_context)
    per_prompt = await core.collect(preps)
    choices = []
    for pos, (prep, states) in enumerate(zip(preps, per_prompt, strict=True)):
        for c in states:
            reader = ReplyReader(prep.tool_parser, _parallel(request))
            text, calls = _read(reader, c.text, final=True)
            c.index += pos * _per_prompt(prep)
            c.finish_reason = finish_reason(c.finish_reason, calls)
            choices.append(_choice(pb, c, text, calls))
    tokens = sum(len(c.token_ids) for states in per_prompt for c in states)
    return pb.GenerateResponse(
        id=preps[0].request_id, model=preps[0].model.name, pool=preps[0].pool.pool.name,
        choices=choices, usage=_usage(pb, preps, tokens),
    )  # fmt: skip


async def generate_stream(core: ServiceCore, request: Any, grpc_context: Any) -> AsyncIterator:
    pb = _pb()
    try:
        preps = await _prepare(core, request, grpc_context)
        stream = await core.open_streams(preps)
    except APIError as e:
        # A streaming method's status only reaches the client through an exception: Serve's
        # proxy turns it into the code set on the context.
        fail(grpc_context, e, None)
        raise
    except Exception as e:  # a bug: INTERNAL, not Serve's traceback (ids, addresses) as details
        err = internal_error(e, "gRPC GenerateStream")
        fail(grpc_context, err, None)
        raise err from None
    first = preps[0]
    readers: dict[tuple[int, int], ReplyReader] = {}
    tokens = 0
    try:
        async for pos, item in stream:
            prep = preps[pos]
            c = ChoiceState(pos * _per_prompt(prep) + item["index"])
            c.add(item, core.logprob_entries(prep.model.name, item.get("logprobs") or []))
            if "prompt_logprobs" in item:
                c.prompt_logprobs = core.logprob_entries(prep.model.name,
                                                         item["prompt_logprobs"])
            key = (pos, item["index"])
            reader = readers.get(key) or readers.setdefault(
                key, ReplyReader(prep.tool_parser, _parallel(request)))
            text, calls = _read(reader, c.text, final=c.finish_reason is not None)
            c.finish_reason = finish_reason(c.finish_reason, reader.calls)
            tokens += len(c.token_ids)
            yield pb.GenerateResponse(id=first.request_id, model=first.model.name,
                                      pool=prep.pool.pool.name,
                                      choices=[_choice(pb, c, text, calls)])  # fmt: skip
    except APIError as e:
        fail(grpc_context, e, None)
        raise
    except Exception as e:
        err = internal_error(e, "gRPC GenerateStream")
        fail(grpc_context, err, None)
        raise err from None
    finally:
        stream.close()
    yield pb.GenerateResponse(id=first.request_id, model=first.model.name,
                              pool=first.pool.pool.name, usage=_usage(pb, preps, tokens))

"""The gRPC methods of ``segserve.v1.SegServe`` (proto/segserve.proto) on the service core.

Ray Serve's gRPC proxy calls the ingress's methods by name; they delegate here. Messages map to
the same ``prepare`` arguments as the HTTP API, and errors to the matching status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from .errors import APIError
from .protocol import ChatMessage
from .responses import ChoiceState
from .service import Prepared, ServiceCore, validation_error

_SCALARS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "n", "logprobs", "beam_width",
    "length_penalty", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip


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
    if opts.HasField("early_stopping"):
        value = {"true": True, "false": False, "never": "never"}.get(opts.early_stopping)
        if value is None:
            raise APIError(400, "early_stopping must be 'true', 'false' or 'never'",
                           "early_stopping")  # fmt: skip
        out["early_stopping"] = value
    return out


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


def _choice(pb: Any, c: ChoiceState) -> Any:
    return pb.Choice(
        index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
        logprobs=[
            pb.TokenLogprob(token_id=e["token_id"], token=e["token"], logprob=e["logprob"],
                            top=[pb.TopLogprob(**t) for t in e["top"]])
            for e in c.logprobs
        ],
    )  # fmt: skip


def _usage(pb: Any, prep: Prepared, completion_tokens: int) -> Any:
    n = len(prep.prompt_ids)
    return pb.Usage(prompt_tokens=n, completion_tokens=completion_tokens,
                    total_tokens=n + completion_tokens,
                    cached_prompt_tokens=prep.cached_tokens)  # fmt: skip


def prepare(core: ServiceCore, request: Any, grpc_context: Any) -> Prepared:
    core.authorize(authorization(grpc_context))
    inputs = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
    if sum(inputs) != 1:
        raise APIError(400, "set exactly one of prompt, prompt_token_ids and messages")
    if not request.model:
        raise APIError(400, "model is required", "model")
    messages = None
    if request.messages:
        try:  # the HTTP API's message schema, so both APIs accept the same roles
            parsed = [ChatMessage(role=m.role, content=m.content) for m in request.messages]
        except ValidationError as e:
            raise validation_error(e) from e
        messages = [m.as_template_input() for m in parsed]
    prompt = request.prompt or list(request.prompt_token_ids) or None
    device = request.device or "auto"
    if device not in ("auto", "gpu", "cpu"):
        raise APIError(400, f"device must be auto, gpu or cpu, not {device!r}", "device")
    return core.prepare(
        request.model, sampling_kwargs(request.sampling), prompt=prompt, messages=messages,
        device=device,
    )  # fmt: skip


async def health(core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    return _pb().HealthResponse(status="ok")


async def list_models(core: ServiceCore, request: Any, grpc_context: Any) -> Any:
    pb = _pb()
    try:
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
        prep = prepare(core, request, grpc_context)
        (choices,) = await core.collect([prep])
    except APIError as e:
        return fail(grpc_context, e, pb.GenerateResponse())
    tokens = sum(len(c.token_ids) for c in choices)
    return pb.GenerateResponse(
        id=prep.request_id, model=prep.model.name, pool=prep.pool.pool.name,
        choices=[_choice(pb, c) for c in choices], usage=_usage(pb, prep, tokens),
    )  # fmt: skip


async def generate_stream(core: ServiceCore, request: Any, grpc_context: Any) -> AsyncIterator:
    pb = _pb()
    try:
        prep = prepare(core, request, grpc_context)
        stream = await core.open_streams([prep])
    except APIError as e:
        # A streaming method's status only reaches the client through an exception: Serve's
        # proxy turns it into the code set on the context.
        fail(grpc_context, e, None)
        raise
    tokens = 0
    try:
        async for _, item in stream:
            c = ChoiceState(item["index"])
            c.add(item, core.logprob_entries(prep.model.name, item.get("logprobs") or []))
            tokens += len(c.token_ids)
            yield pb.GenerateResponse(id=prep.request_id, model=prep.model.name,
                                      pool=prep.pool.pool.name, choices=[_choice(pb, c)])
    except APIError as e:
        fail(grpc_context, e, None)
        raise
    finally:
        stream.close()
    yield pb.GenerateResponse(id=prep.request_id, model=prep.model.name,
                              pool=prep.pool.pool.name, usage=_usage(pb, prep, tokens))

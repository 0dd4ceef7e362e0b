"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and gRPC on one Serve deployment.

Both protocols become the same ``Prepared`` request (validated sampling, token ids, the pool
that serves it) and read the same replica stream; only the rendering differs. The first stream
item is awaited before any response starts, so an error the replica finds (pool too small, its
queue full) still becomes a proper status code rather than a broken stream.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations
# at runtime, and Serve's class-based ingress rebinds the methods where string annotations
# no longer resolve.
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..actors.sampling_params import SamplingParams
from ..models.loader import load_spec, load_tokenizer, resolve_model_path
from .config import ModelConfig, ServiceConfig
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceState,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_chunk,
    completion_logprobs,
    new_id,
    usage_body,
)
from .router import PoolRouter, PoolState

logger = logging.getLogger(__name__)

api = FastAPI(title="segserve", description="OpenAI-compatible LLM serving on Ray Serve")


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


@api.exception_handler(RequestValidationError)
async def _request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(e)
    return JSONResponse(err.body(), status_code=err.status)


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """The first problem, named by its JSON path (what OpenAI's `param` means)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}")
    if err["type"] == "missing":
        return APIError(400, f"missing required field {loc!r}", loc)
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {loc!r}", loc)
    return APIError(400, f"invalid value for {loc!r}: {err['msg']}", loc or None)


@dataclass
class Prepared:
    """A validated request, ready for a replica."""

    model: ModelConfig
    prompt_ids: list[int]
    sampling: dict[str, Any]
    pool: PoolState
    request_id: str
    cached_tokens: int = 0  # prompt tokens the replica found in its prefix cache (at the end)


@dataclass
class ServedModel:
    config: ModelConfig
    tokenizer: Any
    max_model_len: int
    vocab_size: int


class ServiceCore:
    """Protocol-independent request handling shared by the HTTP routes and gRPC methods."""

    def __init__(self, config: ServiceConfig, handles: dict[str, Any], app_name: str) -> None:
        self.config = config
        self.handles = handles
        self.router = PoolRouter(config, app_name)
        self.models: dict[str, ServedModel] = {}
        for m in config.models:
            path = resolve_model_path(m.path)
            spec = load_spec(path)
            self.models[m.name] = ServedModel(
                m, load_tokenizer(path), m.max_model_len or spec.max_position_embeddings,
                spec.vocab_size,
            )  # fmt: skip
        key = config.ingress.api_key
        if config.ingress.api_key_env:
            key = os.environ.get(config.ingress.api_key_env)
            if not key:
                raise ValueError(
                    f"ingress.api_key_env names {config.ingress.api_key_env}, which is not set"
                )
        self.api_key = key

    # ----- checks ---------------------------------------------------------------------------
    def authorize(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    def served_model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"model {name!r} does not exist; models: {sorted(self.models)}",
                           "model")  # fmt: skip
        return served

    def prepare(
        self,
        model: str,
        sampling: dict[str, Any],
        *,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        device: str = "auto",
    ) -> Prepared:
        served = self.served_model(model)
        tok = served.tokenizer
        if messages is not None:
            if not messages:
                raise APIError(400, "messages must not be empty", "messages")
            if tok is None or not getattr(tok, "chat_template", None):
                raise APIError(400, f"model {model!r} has no chat template; use /v1/completions")
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # a template may raise on roles it does not know
                raise APIError(400, f"the chat template rejected the messages: {e}",
                               "messages") from e  # fmt: skip
            # The template already holds the special tokens (BOS) it wants.
            prompt_ids = list(tok(text, add_special_tokens=False).input_ids)
            if "max_tokens" not in sampling:
                # OpenAI's chat default: up to the context length
                room = served.max_model_len - len(prompt_ids)
                sampling = {**sampling, "max_tokens": max(1, room)}
        elif isinstance(prompt, str):
            if tok is None:
                raise APIError(400, f"model {model!r} has no tokenizer; send token ids", "prompt")
            prompt_ids = list(tok(prompt).input_ids)
        else:
            prompt_ids = list(prompt or [])
            bad = [t for t in prompt_ids if not 0 <= t < served.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                               f"[0, {served.vocab_size})", "prompt")  # fmt: skip
        if not prompt_ids:
            raise APIError(400, "prompt is empty", "prompt")
        try:
            params = SamplingParams(**sampling)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from e
        total = len(prompt_ids) + params.max_tokens
        if total > served.max_model_len:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's maximum context length {served.max_model_len}",
                "max_tokens",
            )
        pool = self.router.choose(served.config, device)
        return Prepared(served.config, prompt_ids, sampling, pool, uuid.uuid4().hex)

    # ----- the replica stream ---------------------------------------------------------------
    async def open_stream(self, prep: Prepared) -> AsyncIterator[dict[str, Any]]:
        """Start the request and wait for its first item, so errors surface before a response
        is committed. The returned iterator yields that item first; closing it early (client
        gone) cancels the replica call, which aborts the request and frees its KV blocks."""
        handle = self.handles[prep.pool.deployment].options(stream=True)
        gen = None
        prep.pool.in_flight += 1
        try:
            # Serve may refuse at .remote() already (its handle queue is full: backpressure).
            gen = handle.generate.remote(prep.prompt_ids, prep.sampling, prep.request_id)
            first = await gen.__anext__()
        except asyncio.CancelledError:  # the client went away while we waited
            prep.pool.in_flight -= 1
            if gen is not None:
                gen.cancel()
            raise
        except Exception as e:  # the call failed: nothing left to cancel
            prep.pool.in_flight -= 1
            raise _replica_error(e) from e
        if "error" in first:
            prep.pool.in_flight -= 1
            raise APIError.from_dict(first["error"])
        return self._rest(gen, first, prep)

    @staticmethod
    async def _rest(gen: Any, first: dict[str, Any], prep: Prepared) -> AsyncIterator[dict]:
        finished = False
        try:
            item = first
            while True:
                prep.cached_tokens = item.get("num_cached_tokens", prep.cached_tokens)
                yield item
                item = await gen.__anext__()
                if "error" in item:
                    raise APIError.from_dict(item["error"])
        except StopAsyncIteration:
            finished = True
        except (APIError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise _replica_error(e) from e
        finally:
            prep.pool.in_flight -= 1
            if not finished:
                gen.cancel()

    def logprob_entries(self, model: str, wire: list[tuple]) -> list[dict[str, Any]]:
        tok = self.models[model].tokenizer

        def text(t: int) -> str:
            return tok.decode([t]) if tok is not None else str(t)

        return [
            {"token_id": tid, "token": text(tid), "logprob": lp,
             "top": [{"token_id": t, "token": text(t), "logprob": v} for t, v in top]}
            for tid, lp, top in wire
        ]  # fmt: skip

    async def collect(self, prep: Prepared, stream: AsyncIterator[dict]) -> list[ChoiceState]:
        choices: dict[int, ChoiceState] = {}
        async for item in stream:
            c = choices.setdefault(item["index"], ChoiceState(item["index"]))
            self.accumulate(prep, c, item)
        return [choices[i] for i in sorted(choices)]

    def accumulate(self, prep: Prepared, c: ChoiceState, item: dict[str, Any]) -> None:
        c.text += item["text"]
        c.token_ids += item["token_ids"]
        if "logprobs" in item:
            c.logprobs += self.logprob_entries(prep.model.name, item["logprobs"])
        c.finish_reason = item.get("finish_reason", c.finish_reason)

    def list_models(self) -> list[dict[str, Any]]:
        return [
            {"id": name, "pools": [s.pool.name for s in self.router.pools[name]],
             "max_model_len": m.max_model_len}
            for name, m in self.models.items()
        ]  # fmt: skip


def _replica_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, BackPressureError):
        return APIError(429, f"the service is overloaded, retry later ({e})")
    if isinstance(e, DeploymentUnavailableError):
        return APIError(503, f"no replica is available: {e}")
    logger.exception("replica call failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _usage(prep: Prepared, completion_tokens: int) -> dict[str, Any]:
    return usage_body(len(prep.prompt_ids), completion_tokens, prep.cached_tokens)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _parse(request: Request, model: type) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from e


# ----- gRPC helpers ------------------------------------------------------------------------
_GRPC_SCALARS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "n", "logprobs", "beam_width",
    "length_penalty", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip


def _grpc_sampling(opts: Any) -> dict[str, Any]:
    out = {k: getattr(opts, k) for k in _GRPC_SCALARS if opts.HasField(k)}
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


def _grpc_authorization(grpc_context: Any) -> str | None:
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key.lower() == "authorization":
            return value
    return None


def _grpc_fail(grpc_context: Any, e: APIError, response: Any) -> Any:
    import grpc

    if grpc_context is not None:
        grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code_name))
        grpc_context.set_details(e.message)
    return response


def _pb_choice(pb: Any, c: ChoiceState) -> Any:
    return pb.Choice(
        index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
        logprobs=[
            pb.TokenLogprob(token_id=e["token_id"], token=e["token"], logprob=e["logprob"],
                            top=[pb.TopLogprob(**t) for t in e["top"]])
            for e in c.logprobs
        ],
    )  # fmt: skip


def _pb_usage(pb: Any, prep: Prepared, completion_tokens: int) -> Any:
    n = len(prep.prompt_ids)
    return pb.Usage(prompt_tokens=n, completion_tokens=completion_tokens,
                    total_tokens=n + completion_tokens,
                    cached_prompt_tokens=prep.cached_tokens)  # fmt: skip


# Serve pickles the FastAPI app when the class is decorated, with the module globals its
# routes use at that moment: everything they call must be defined above this point.
@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP routes below; gRPC methods (named as in proto/segserve.proto) further down."""

    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        app_name = serve.get_replica_context().app_name
        self.core = ServiceCore(ServiceConfig.model_validate(config), handles, app_name)

    # ----- HTTP -----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self.core.authorize(request.headers.get("authorization"))
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": m["id"], "object": "model", "created": created, "owned_by": "segserve",
                 "max_model_len": m["max_model_len"], "pools": m["pools"]}
                for m in self.core.list_models()
            ],
        }  # fmt: skip

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self.core.authorize(request.headers.get("authorization"))
        body = await _parse(request, CompletionRequest)
        prep = self.core.prepare(
            body.model, body.sampling(), prompt=body.single_prompt(), device=body.device
        )
        stream = await self.core.open_stream(prep)
        rid, want_lp = new_id("cmpl"), body.logprobs is not None
        if not body.stream:
            choices = await self.core.collect(prep, stream)
            usage = _usage(prep, sum(len(c.token_ids) for c in choices))
            return completion_body(rid, body.model, choices, usage, want_lp)
        events = self._completion_events(prep, stream, rid, body, want_lp)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _completion_events(
        self, prep: Prepared, stream: AsyncIterator[dict], rid: str, body: CompletionRequest,
        want_lp: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        created, completion_tokens = int(time.time()), 0
        text_len: dict[int, int] = {}  # per choice, for logprobs' text_offset
        try:
            async for item in stream:
                completion_tokens += len(item["token_ids"])
                lp = None
                if want_lp and "logprobs" in item:
                    entries = self.core.logprob_entries(body.model, item["logprobs"])
                    lp = completion_logprobs(entries, text_len.get(item["index"], 0))
                text_len[item["index"]] = text_len.get(item["index"], 0) + len(item["text"])
                choice = {"index": item["index"], "text": item["text"], "logprobs": lp,
                          "finish_reason": item.get("finish_reason")}  # fmt: skip
                yield _sse(completion_chunk(rid, body.model, created, choice))
            if body.include_usage:
                usage = _usage(prep, completion_tokens)
                yield _sse({**completion_chunk(rid, body.model, created, {}), "choices": [],
                            "usage": usage})  # fmt: skip
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self.core.authorize(request.headers.get("authorization"))
        body = await _parse(request, ChatCompletionRequest)
        prep = self.core.prepare(
            body.model, body.sampling(), messages=body.template_messages(), device=body.device
        )
        stream = await self.core.open_stream(prep)
        rid = new_id("chatcmpl")
        if not body.stream:
            choices = await self.core.collect(prep, stream)
            usage = _usage(prep, sum(len(c.token_ids) for c in choices))
            return chat_body(rid, body.model, choices, usage, body.logprobs)
        return StreamingResponse(
            self._chat_events(prep, stream, rid, body), media_type="text/event-stream"
        )

    async def _chat_events(
        self, prep: Prepared, stream: AsyncIterator[dict], rid: str, body: ChatCompletionRequest
    ) -> AsyncIterator[str]:
        created, completion_tokens, started = int(time.time()), 0, set()
        try:
            async for item in stream:
                i = item["index"]
                if i not in started:  # OpenAI opens each choice with its role
                    started.add(i)
                    delta0 = {"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}  # fmt: skip
                    yield _sse(chat_chunk(rid, body.model, created, [delta0]))
                completion_tokens += len(item["token_ids"])
                lp = None
                if body.logprobs and "logprobs" in item:
                    lp = chat_logprobs(self.core.logprob_entries(body.model, item["logprobs"]))
                delta = {"content": item["text"]} if item["text"] else {}
                choice = {"index": i, "delta": delta, "logprobs": lp,
                          "finish_reason": item.get("finish_reason")}  # fmt: skip
                yield _sse(chat_chunk(rid, body.model, created, [choice]))
            if body.include_usage:
                usage = _usage(prep, completion_tokens)
                yield _sse({**chat_chunk(rid, body.model, created, []), "usage": usage})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # ----- gRPC (Ray Serve's gRPC proxy calls these by method name) -------------------------
    async def Health(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from ..proto import segserve_pb2 as pb

        return pb.HealthResponse(status="ok")

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from ..proto import segserve_pb2 as pb

        try:
            self.core.authorize(_grpc_authorization(grpc_context))
        except APIError as e:
            return _grpc_fail(grpc_context, e, pb.ListModelsResponse())
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(id=m["id"], pools=m["pools"], max_model_len=m["max_model_len"])
                    for m in self.core.list_models()]  # fmt: skip
        )

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from ..proto import segserve_pb2 as pb

        try:
            prep = self._grpc_prepare(request, grpc_context)
            choices = await self.core.collect(prep, await self.core.open_stream(prep))
        except APIError as e:
            return _grpc_fail(grpc_context, e, pb.GenerateResponse())
        tokens = sum(len(c.token_ids) for c in choices)
        return pb.GenerateResponse(
            id=prep.request_id, model=prep.model.name, pool=prep.pool.pool.name,
            choices=[_pb_choice(pb, c) for c in choices], usage=_pb_usage(pb, prep, tokens),
        )  # fmt: skip

    async def GenerateStream(  # noqa: N802
        self, request: Any, grpc_context: Any = None
    ) -> AsyncIterator[Any]:
        from ..proto import segserve_pb2 as pb

        try:
            prep = self._grpc_prepare(request, grpc_context)
            stream = await self.core.open_stream(prep)
        except APIError as e:
            # A streaming method's status only reaches the client through an exception:
            # Serve's proxy turns it into the code set on the context.
            _grpc_fail(grpc_context, e, None)
            raise
        tokens = 0
        try:
            async for item in stream:
                c = ChoiceState(item["index"])
                self.core.accumulate(prep, c, item)
                tokens += len(c.token_ids)
                yield pb.GenerateResponse(id=prep.request_id, model=prep.model.name,
                                          pool=prep.pool.pool.name, choices=[_pb_choice(pb, c)])
        except APIError as e:
            _grpc_fail(grpc_context, e, None)
            raise
        yield pb.GenerateResponse(id=prep.request_id, model=prep.model.name,
                                  pool=prep.pool.pool.name, usage=_pb_usage(pb, prep, tokens))

    def _grpc_prepare(self, request: Any, grpc_context: Any) -> Prepared:
        self.core.authorize(_grpc_authorization(grpc_context))
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
        return self.core.prepare(
            request.model, _grpc_sampling(request.sampling), prompt=prompt, messages=messages,
            device=device,
        )  # fmt: skip

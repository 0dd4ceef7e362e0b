"""A thin Python client of segserve's gRPC API (``segserve.v1.SegServe``).

    from segserve.proto import SegServeClient

    with SegServeClient("localhost:9000", api_key="...") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).choices[0].text)
        for chunk in client.generate_stream("Hello", max_tokens=16):
            print(chunk.choices[0].text, end="", flush=True)

Errors are the ``grpc.RpcError`` the server (or the channel) raised, unwrapped: ``e.code()`` and
``e.details()`` say what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor

from . import segserve_pb2, segserve_pb2_grpc

# Every SamplingOptions field is a keyword of generate()/generate_stream(), so a field added to
# the .proto is usable without touching this file.
_SAMPLING_FIELDS: Mapping[str, FieldDescriptor] = (
    segserve_pb2.SamplingOptions.DESCRIPTOR.fields_by_name)
_EARLY_STOPPING = {True: "true", False: "false", "true": "true", "false": "false",
                   "never": "never"}

ChatMessageLike = Mapping[str, Any] | segserve_pb2.ChatMessage
ToolLike = Mapping[str, Any] | segserve_pb2.Tool


def sampling_options(**sampling: Any) -> segserve_pb2.SamplingOptions:
    """``SamplingOptions`` from keywords named like its fields.

    A keyword that is None (or not given) stays unset, so the server applies the engine's
    default; presence is what the server reads, not the value (``temperature=0`` is sent).
    ``stop`` takes a string or a list of them; ``early_stopping`` takes True, False or "never".
    """
    unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}; "
                        f"known: {', '.join(_SAMPLING_FIELDS)}")
    options = segserve_pb2.SamplingOptions()
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "early_stopping":
            try:
                value = _EARLY_STOPPING[value]
            except (KeyError, TypeError):
                raise ValueError(f"early_stopping must be True, False or 'never', "
                                 f"got {value!r}") from None
        elif name == "stop" and isinstance(value, str):
            value = [value]
        elif name == "structured":
            value = structured_output(value)
        field = _SAMPLING_FIELDS[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(options, name).update(value)  # logit_bias: {token id: bias}
        elif field.is_repeated:
            getattr(options, name).extend(value)
        elif name == "structured":
            options.structured.CopyFrom(value)
        else:
            setattr(options, name, value)
    return options


def structured_output(spec: Any) -> segserve_pb2.StructuredOutput:
    """A ``StructuredOutput`` from one ``{kind: value}`` as SamplingParams.structured takes it:
    ``{"json": schema dict or JSON text}``, ``{"json_object": True}``, ``{"regex": ...}``,
    ``{"choice": [...]}`` or ``{"grammar": ...}``."""
    if isinstance(spec, segserve_pb2.StructuredOutput):
        return spec
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ValueError(f"structured takes one {{kind: value}}, got {spec!r}")
    (kind, value), = spec.items()
    if kind == "json":
        return segserve_pb2.StructuredOutput(
            json_schema=value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        return segserve_pb2.StructuredOutput(choice=segserve_pb2.Choices(values=list(value)))
    if kind not in ("json_object", "regex", "grammar"):
        raise ValueError(f"unknown structured output kind {kind!r}")
    return segserve_pb2.StructuredOutput(**{kind: value})


def _message(m: ChatMessageLike) -> segserve_pb2.ChatMessage:
    if isinstance(m, segserve_pb2.ChatMessage):
        return m
    calls = [segserve_pb2.ToolCall(id=c["id"], type=c.get("type", "function"),
                                   name=c["function"]["name"],
                                   arguments=c["function"]["arguments"])
             for c in m.get("tool_calls") or []]
    return segserve_pb2.ChatMessage(role=m["role"], content=m.get("content") or "",
                                    name=m.get("name") or "", tool_calls=calls,
                                    tool_call_id=m.get("tool_call_id") or "")


def _tool(t: ToolLike) -> segserve_pb2.Tool:
    """A tool in OpenAI's shape ({"type": "function", "function": {...}}) as a ``Tool``."""
    if isinstance(t, segserve_pb2.Tool):
        return t
    f = t.get("function", t)
    params = f.get("parameters")
    return segserve_pb2.Tool(name=f["name"], description=f.get("description") or "",
                             parameters=json.dumps(params) if params is not None else "")


def _tool_choice(choice: Any) -> segserve_pb2.ToolChoice:
    if isinstance(choice, segserve_pb2.ToolChoice):
        return choice
    if isinstance(choice, str):
        return segserve_pb2.ToolChoice(mode=choice)
    return segserve_pb2.ToolChoice(function=choice["function"]["name"])


def generate_request(prompt: str | Sequence[str] | None = None, *, model: str = "demo",
                     messages: Iterable[ChatMessageLike] | None = None,
                     prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                     device: str = "auto", tools: Iterable[ToolLike] | None = None,
                     tool_choice: str | Mapping[str, Any] | None = None,
                     parallel_tool_calls: bool | None = None,
                     **sampling: Any) -> segserve_pb2.GenerateRequest:
    """The ``GenerateRequest`` that ``SegServeClient.generate`` sends (exposed for tests and for
    callers that drive the stub themselves). A list of prompts (texts, or token-id lists) is a
    batch; ``tools`` and ``tool_choice`` take OpenAI's shapes and go with ``messages``."""
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("prompt_token_ids", prompt_token_ids))
             if value is not None]
    if len(given) != 1:
        # The .proto's contract; checked here so the mistake shows at the call, not as a
        # server-side INVALID_ARGUMENT.
        raise ValueError("give exactly one of prompt, messages and prompt_token_ids, got "
                         + (", ".join(given) or "none"))
    request = segserve_pb2.GenerateRequest(model=model, device=device,
                                           sampling=sampling_options(**sampling))
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompts.extend(prompt)
    elif prompt_token_ids is not None:
        if prompt_token_ids and not isinstance(prompt_token_ids[0], int):
            request.prompt_token_id_lists.extend(
                segserve_pb2.TokenIds(ids=ids) for ids in prompt_token_ids)
        else:
            request.prompt_token_ids.extend(prompt_token_ids)
    else:
        assert messages is not None
        request.messages.extend(_message(m) for m in messages)
    if tools is not None:
        request.tools.extend(_tool(t) for t in tools)
    if tool_choice is not None:
        request.tool_choice.CopyFrom(_tool_choice(tool_choice))
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    return request


class SegServeClient:
    """One gRPC channel to a segserve deployment (Ray Serve's gRPC proxy, default port 9000).

    ``api_key`` is sent as ``authorization: Bearer <key>``; ``application`` as the
    ``application`` metadata key, by which Ray Serve's proxy picks the Serve application when
    more than one is running. ``timeout`` (seconds) is each call's deadline; for
    ``generate_stream`` it bounds the whole stream.
    """

    def __init__(self, target: str = "localhost:9000", api_key: str | None = None,
                 application: str | None = None, timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        metadata = []
        if api_key is not None:
            metadata.append(("authorization", f"Bearer {api_key}"))
        if application is not None:
            metadata.append(("application", application))
        self._metadata = tuple(metadata)
        self._channel = grpc.insecure_channel(target)
        self._stub = segserve_pb2_grpc.SegServeStub(self._channel)

    def generate(self, prompt: str | Sequence[str] | None = None,
                 **kwargs: Any) -> segserve_pb2.GenerateResponse:
        """One response with every choice, once the request has finished. Keywords are
        ``generate_request``'s: model, messages, prompt_token_ids, device, tools, tool_choice,
        parallel_tool_calls, and ``SamplingOptions`` fields (see ``sampling_options``)."""
        request = generate_request(prompt, **kwargs)
        return self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)

    def generate_stream(self, prompt: str | Sequence[str] | None = None,
                        **kwargs: Any) -> Iterator[segserve_pb2.GenerateResponse]:
        """Responses carrying each choice's new text (and tool calls) as they are generated;
        the last one carries usage. Closing the iterator early (``break``, ``close()``)
        cancels the request."""
        # The request is built here, not inside the generator, so a bad argument raises at the
        # call rather than at the first next().
        request = generate_request(prompt, **kwargs)
        call = self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._metadata)
        return self._iterate(call)

    @staticmethod
    def _iterate(call: Any) -> Iterator[segserve_pb2.GenerateResponse]:
        try:
            yield from call
        finally:
            # No-op once the stream has ended; otherwise it tells the server to stop generating
            # for a reader who has gone away.
            call.cancel()

    def list_models(self) -> segserve_pb2.ListModelsResponse:
        return self._stub.ListModels(segserve_pb2.ListModelsRequest(), timeout=self.timeout,
                                     metadata=self._metadata)

    def health(self) -> segserve_pb2.HealthResponse:
        return self._stub.Health(segserve_pb2.HealthRequest(), timeout=self.timeout,
                                 metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SegServeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SegServeClient({self.target!r})"

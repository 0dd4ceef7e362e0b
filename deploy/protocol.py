"""The OpenAI-compatible wire format: request schemas, errors, and response bodies.

Requests are validated strictly (no string-to-number coercion, unknown fields refused) so a
client bug surfaces as a 400 naming the field instead of a silently different generation.
segserve's extensions (top_k, beam search, device preference, ...) are extra body fields, as
the `openai` client's ``extra_body`` sends them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DevicePreference = Literal["auto", "gpu", "cpu"]

# OpenAI fields we accept and ignore: they never change what is generated.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class APIError(Exception):
    """An error the client caused (or overload); rendered as an OpenAI error body."""

    GRPC_CODES = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }
    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        500: "internal_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions across processes; the default would call APIError(message).
        return (type(self), (self.status, self.message, self.param))

    @property
    def grpc_code_name(self) -> str:
        return self.GRPC_CODES.get(self.status, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.status,
            }
        }

    def to_dict(self) -> dict[str, Any]:
        """Crosses the Ray boundary (replica -> ingress) as plain data."""
        return {"status": self.status, "message": self.message, "param": self.param}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(d["status"], d["message"], d.get("param"))


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    # segserve extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    beam_width: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    device: DevicePreference = "auto"
    # accepted, ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    _SAMPLING = (
        "n", "max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty",
        "seed", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos",
        "include_stop_str_in_output", "skip_special_tokens", "beam_width", "length_penalty",
        "early_stopping",
    )  # fmt: skip

    def sampling(self) -> dict[str, Any]:
        """SamplingParams kwargs for the fields the client set (the rest keep the engine's
        defaults). SamplingParams itself range-checks them."""
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        out = {k: getattr(self, k) for k in self._SAMPLING if getattr(self, k) is not None}
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (server-side best-of is not supported)",
                           "best_of")  # fmt: skip
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request (batched prompts are not "
                               "supported)", "prompt")  # fmt: skip
            p = p[0]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        return p

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else (c or "")
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if self.tools or self.tool_choice not in (None, "none"):
            raise APIError(400, "tool calling is not supported", "tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise APIError(400, "only response_format type 'text' is supported",
                           "response_format")  # fmt: skip
        return [m.as_template_input() for m in self.messages]

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        return out


# Pydantic resolves the forward reference to StreamOptions once it is defined.
for _cls in (_Request, CompletionRequest, ChatCompletionRequest):
    _cls.model_rebuild()

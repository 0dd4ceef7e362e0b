"""The OpenAI-compatible request schema: the API's reference.

Every field a request may carry is declared here, grouped by where it comes from (OpenAI, vLLM's
extensions, segserve's own). The rules, for every object in a request:

- Types are strict: "8" is not a number and 1 is not a boolean, so a client bug is a 400 naming
  the field (its JSON path, OpenAI's ``param``) instead of a silently different generation.
- An explicit ``null`` means the field's default, as the OpenAI spec and SDKs that send unset
  fields as null expect.
- Ranges follow OpenAI (temperature 0-2, penalties -2..2, ...).
- Unknown fields are accepted and ignored, with one warning log line per field name (as vLLM
  does), so a client built for a newer API still works. Known fields segserve cannot honour
  are refused with a 400 naming them rather than silently ignored.

``sampling()`` maps a request to ``SamplingParams`` keyword arguments (which range-check again).
segserve's extensions are extra body fields, as the ``openai`` client's ``extra_body`` sends them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..actors.structured import json_depth
from .errors import APIError

logger = logging.getLogger(__name__)

DevicePreference = Literal["auto", "gpu", "cpu"]

# Unknown field names warned about, once each. Clients choose the names, so the set is
# bounded: past it, no more warnings (a client sending 20,000 invented keys per request would
# otherwise grow it, and the log, without end).
_warned_fields: set[str] = set()
MAX_WARNED_FIELDS = 256


def _warn_unknown(name: str) -> None:
    if name in _warned_fields or len(_warned_fields) > MAX_WARNED_FIELDS:
        return
    _warned_fields.add(name)
    if len(_warned_fields) > MAX_WARNED_FIELDS:
        logger.warning("ignoring unknown request fields; %d names logged, no more will be",
                       MAX_WARNED_FIELDS)  # fmt: skip
        return
    logger.warning("ignoring unknown request field %r (logged once per field name)", name[:80])


def _not_supported(param: str, what: str | None = None) -> APIError:
    return APIError(400, f"{what or param} is not supported", param)


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format as a structured-output constraint (None: plain text)."""
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format json_schema needs a json_schema object",
                           "response_format.json_schema")  # fmt: skip
        schema = spec.get("schema", {"type": "object"})  # vLLM: no schema = any object
        if not isinstance(schema, dict):
            raise APIError(400, "json_schema.schema must be an object",
                           "response_format.json_schema.schema")  # fmt: skip
        # strict or not, the reply is constrained to the schema (vLLM does the same)
        return {"json": schema}
    raise _not_supported("response_format.type", f"response_format type {kind!r}")


# vLLM's structured_outputs object: the constraint keys, and options with no effect here
# A request's own prefix-cache salt (HTTP cache_salt, gRPC SamplingOptions.cache_salt).
CACHE_SALT_MAX_CHARS = 128
# The deepest JSON a history's call arguments go to the chat template as: deeper is text. Not
# left to Python's recursion limit, which the process may have raised (torch's compiler makes
# it 2,000): json.loads then parses what the template's renderer cannot, and the request fails.
MAX_TEMPLATE_JSON_DEPTH = 64
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_STRUCTURED_OPTIONS = frozenset({"disable_fallback", "disable_any_whitespace",
                                 "disable_additional_properties", "whitespace_pattern",
                                 "backend"})  # fmt: skip


def _structured_outputs(obj: dict[str, Any]) -> dict[str, Any]:
    given = {k: v for k, v in obj.items() if k in _STRUCTURED_KEYS and v not in (None, False)}
    unknown = set(obj) - set(_STRUCTURED_KEYS) - _STRUCTURED_OPTIONS
    if unknown:
        key = sorted(unknown)[0]
        raise _not_supported(f"structured_outputs.{key}", f"structured_outputs.{key}")
    if len(given) != 1:
        raise APIError(400, f"structured_outputs must set exactly one of "
                       f"{', '.join(_STRUCTURED_KEYS)}", "structured_outputs")  # fmt: skip
    return given


class _Schema(BaseModel):
    """Every object of a request: strict types, null = default, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    _where: ClassVar[str] = ""  # the object's JSON path prefix, for the unknown-field warning
    _warn_extra: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required()}  # fmt: skip

    @model_validator(mode="after")
    def _ignore_unknown(self) -> _Schema:
        if self._warn_extra:
            for name in self.model_extra or {}:
                _warn_unknown(self._where + name)
        return self


class StreamOptions(_Schema):
    _where = "stream_options."
    include_usage: bool = False  # a last chunk with the whole request's usage
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


class _Request(_Schema):
    """The fields completions and chat share."""

    model: str = Field(min_length=1)

    # ----- OpenAI -------------------------------------------------------------------------------
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    # accepted, no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    # ----- vLLM's extensions --------------------------------------------------------------------
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    length_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # Accepted, no effect: the detokenizer runs HF fast tokenizers, which have no such option.
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last k; -1: context len
    add_special_tokens: bool | None = None  # default: true for completions, false for chat
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # the prompt's tokens, N best each
    return_tokens_as_token_ids: bool = False  # log-prob tokens as "token_id:<id>"
    use_beam_search: bool = False  # beam width: best_of (completions) or n
    early_stopping: bool | Literal["never"] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # structured output (vLLM's names)
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    # ----- segserve's own -----------------------------------------------------------------------
    beam_width: int | None = None  # > 1: beam search returning every beam, best first
    device: DevicePreference = "auto"  # which pool may serve it
    # Prefix-cache isolation (vLLM's name): only requests with the same salt share cached blocks.
    cache_salt: str | None = Field(None, min_length=1, max_length=CACHE_SALT_MAX_CHARS)

    _SAMPLING: ClassVar[tuple[str, ...]] = (
        "n", "max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty",
        "seed", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos",
        "include_stop_str_in_output", "skip_special_tokens", "beam_width", "length_penalty",
        "early_stopping", "cache_salt",
    )  # fmt: skip

    def _logit_bias(self) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            # ASCII digits only: str.isdigit() also takes "²" and "٣", and int() of a key of
            # thousands of digits raises.
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise APIError(400, f"logit_bias keys are token ids, not {key[:40]!r}",
                               f"logit_bias.{key[:40]}")  # fmt: skip
            if not -100 <= bias <= 100:
                raise APIError(400, "logit_bias values must lie in [-100, 100]",
                               f"logit_bias.{key}")  # fmt: skip
            out[int(key)] = bias
        return out

    def structured(self) -> tuple[dict[str, Any], str] | None:
        """The structured-output constraint (SamplingParams.structured) and the field that
        set it (errors name it), or None. One constraint per request."""
        given = []
        if self.response_format is not None:
            spec = _response_format(self.response_format)
            if spec is not None:
                given.append((spec, "response_format"))
        if self.guided_json is not None:
            given.append(({"json": self.guided_json}, "guided_json"))
        if self.guided_regex is not None:
            given.append(({"regex": self.guided_regex}, "guided_regex"))
        if self.guided_choice is not None:
            given.append(({"choice": self.guided_choice}, "guided_choice"))
        if self.guided_grammar is not None:
            given.append(({"grammar": self.guided_grammar}, "guided_grammar"))
        if self.structured_outputs is not None:
            given.append((_structured_outputs(self.structured_outputs), "structured_outputs"))
        if len(given) > 1:
            raise APIError(400, f"{given[0][1]} and {given[1][1]} both constrain the output; "
                           "send one", given[1][1])  # fmt: skip
        return given[0] if given else None

    def sampling(self) -> dict[str, Any]:
        """SamplingParams kwargs for the fields the client set (the rest keep the engine's
        defaults). SamplingParams itself range-checks them."""
        out = {k: getattr(self, k) for k in self._SAMPLING if getattr(self, k) is not None}
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.use_beam_search:
            out["beam_width"], out["n"] = self.beam_search_width, 1
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                           f"({self.max_tokens})", "min_tokens")  # fmt: skip
        if self.min_tokens:
            out["min_tokens"] = self.min_tokens
        if self.logit_bias:
            out["logit_bias"] = self._logit_bias()
        if self.allowed_token_ids is not None:
            out["allowed_token_ids"] = self.allowed_token_ids
        if self.bad_words:
            out["bad_words"] = self.bad_words
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        structured = self.structured()
        if structured is not None:
            out["structured"] = structured[0]
        return out

    @property
    def structured_param(self) -> str:
        """The request field behind SamplingParams.structured (the engine's errors say
        "structured"; the client sent this)."""
        found = self.structured()
        return found[1] if found else "structured"

    @property
    def beam_search_width(self) -> int:
        return self.n

    @property
    def ranks_by_logprob(self) -> bool:
        """best_of > n: the engine samples best_of, the response keeps the n most likely."""
        return False

    @property
    def returned_choices(self) -> int | None:
        """How many choices the response keeps, best first; None: every one the engine made."""
        return self.n if self.use_beam_search or self.ranks_by_logprob else None

    @property
    def choices_per_prompt(self) -> int:
        """Choices of each prompt in the response: prompt i's are i * this + 0, 1, ..."""
        if self.returned_choices is not None:
            return self.returned_choices
        return self.beam_width if self.beam_width and self.beam_width > 1 else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or a batch (a list of texts or of token-id lists)."""
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of ({self.best_of}) must be >= n ({self.n})", "best_of")
        if self.ranks_by_logprob and self.stream:
            raise APIError(400, "best_of > n cannot be streamed (the best are known at the end)",
                           "best_of")  # fmt: skip
        p = self.prompt
        batched = isinstance(p, list) and bool(p) and isinstance(p[0], str | list)
        batch = p if batched else [p]
        for i, one in enumerate(batch):
            if not one:
                raise APIError(400, "prompt is empty", f"prompt.{i}" if batched else "prompt")
        return batch

    @property
    def beam_search_width(self) -> int:
        return max(self.n, self.best_of or 1)

    @property
    def ranks_by_logprob(self) -> bool:
        return self.best_of is not None and self.best_of > self.n and not self.use_beam_search

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
            if self.echo:  # the echoed prompt's tokens come with their log-probs too
                out["prompt_logprobs"] = max(self.logprobs, out.get("prompt_logprobs", 0))
        if self.ranks_by_logprob:
            out["n"] = self.best_of
            # the ranking sums the chosen tokens' log-probs; they are not returned unless asked
            out.setdefault("logprobs", 0)
        return out


class TextPart(_Schema):
    _where = "messages[].content[]."
    type: Literal["text"]
    text: str


class FunctionCall(_Schema):
    _where = "tool_calls[].function."
    name: str
    arguments: str  # JSON text


class ToolCallIn(_Schema):
    """An assistant message's earlier call, in the history."""

    _where = "tool_calls[]."
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_input(self) -> dict[str, Any]:
        # Templates write the arguments with `tojson`: they want the object, not its JSON text
        # (as vLLM hands them over). Text that is not JSON goes as it is.
        try:
            args: Any = json.loads(self.function.arguments)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            args = self.function.arguments
        if json_depth(args, MAX_TEMPLATE_JSON_DEPTH) > MAX_TEMPLATE_JSON_DEPTH:
            args = self.function.arguments
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": args}}  # fmt: skip


class ChatMessage(_Schema):
    """One message of the history. Fields beyond these are handed to the chat template as
    they are (templates read e.g. ``reasoning_content``), as vLLM does."""

    _warn_extra = False
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this is the result of

    @property
    def text(self) -> str:
        c = self.content
        return "".join(p.text for p in c) if isinstance(c, list) else (c or "")

    def as_template_input(self) -> dict[str, Any]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text}  # fmt: skip
        if self.name is not None:
            out["name"] = self.name
        # Only when present: templates test `'tool_calls' in message`.
        if self.tool_calls:
            out["tool_calls"] = [c.as_template_input() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return {**(self.model_extra or {}), **out}


class FunctionDefinition(_Schema):
    _where = "tools[].function."
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDefinition(_Schema):
    _where = "tools[]."
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Schema):
    _where = "tool_choice.function."
    name: str


class NamedToolChoice(_Schema):
    _where = "tool_choice."
    type: Literal["function"]
    function: NamedFunction


def tool_call_schema(functions: list[FunctionDefinition], name: str | None,
                     parallel: bool) -> dict[str, Any]:  # fmt: skip
    """The JSON schema a forced reply follows: the named function's arguments, or (tool_choice
    "required") a list of ``{"name", "parameters"}`` calls of the tools, as vLLM does."""
    def params(f: FunctionDefinition) -> dict[str, Any]:
        return f.parameters or {"type": "object"}

    if name is not None:
        return params(next(f for f in functions if f.name == name))
    calls = [{"type": "object", "properties": {"name": {"enum": [f.name]},
                                               "parameters": params(f)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for f in functions]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# Keys of apply_chat_template that chat_template_kwargs may not set: they are the service's.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tokenize", "return_dict", "return_tensors", "padding", "truncation",
    "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
})  # fmt: skip


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Tools go to the chat template as the client sent them (key order included); calls in the
    # reply are parsed by the model's tool parser (tool_parsers.py) into message.tool_calls.
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call per reply
    functions: list[Any] | None = None  # OpenAI's deprecated spelling: refused, names tools
    function_call: Any = None
    # vLLM's chat extensions
    echo: bool = False  # start the reply with the last message's content when roles match
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None

    _raw_tools: list[dict[str, Any]] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_tools(cls, data: Any, handler: Any) -> ChatCompletionRequest:
        request = handler(data)
        if request.tools:
            request._raw_tools = data["tools"] if isinstance(data, dict) else None
        return request

    @model_validator(mode="after")
    def _own_fields_from_template_kwargs(self) -> ChatCompletionRequest:
        """vLLM lets chat_template_kwargs set the generation-prompt switches: they become the
        fields, with their type and checks, so the echo and the template see the same value.
        Tools there would skip the tool checks and the reply's parser: they must be a field."""
        kwargs = self.chat_template_kwargs or {}
        for key in ("add_generation_prompt", "continue_final_message"):
            if key in kwargs:
                if not isinstance(kwargs[key], bool):
                    raise APIError(400, f"chat_template_kwargs.{key} must be a boolean",
                                   f"chat_template_kwargs.{key}")  # fmt: skip
                setattr(self, key, kwargs.pop(key))
        if "tools" in kwargs:
            raise APIError(400, "send tools as the request's tools field, not in "
                           "chat_template_kwargs", "chat_template_kwargs.tools")  # fmt: skip
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise APIError(400, "messages must not be empty", "messages")
        return [m.as_template_input() for m in self.messages]

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def parses_tool_calls(self) -> bool:
        """Whether calls in the reply become tool_calls (tool_choice "none": they stay text)."""
        return bool(self.tools) and self.effective_tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """tool_choice "required" ("*") or the named function: the reply is constrained to
        calls (tool_call_schema) and read as JSON, whatever the model's own call format."""
        choice = self.effective_tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        return "*" if choice == "required" and self.tools else None

    @property
    def structured_param(self) -> str:
        # A required or named tool_choice constrains the reply with the tools' schemas.
        if self.structured() is None and self.forced_tool is not None:
            return "tools"
        return super().structured_param

    def tool_constraint(self) -> dict[str, Any] | None:
        forced = self.forced_tool
        if forced is None:
            return None
        self._check_tools()  # the named function is among the tools
        functions = [t.function for t in self.tools or []]
        return {"json": tool_call_schema(functions, None if forced == "*" else forced,
                                         self.parallel_tool_calls)}  # fmt: skip

    def _check_tools(self) -> None:
        if self.functions is not None or self.function_call is not None:
            raise APIError(400, "functions/function_call are deprecated and not supported; "
                           "send tools and tool_choice", "functions")  # fmt: skip
        choice = self.effective_tool_choice
        if choice == "none":
            return
        if not self.tools:
            shown = repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"
            raise APIError(400, f"tool_choice {shown} needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names function {choice.function.name!r}, "
                               f"which is not among the tools {names}",
                               "tool_choice.function.name")  # fmt: skip

    def template_kwargs(self) -> dict[str, Any]:
        """apply_chat_template's keyword arguments besides the messages."""
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both "
                           "be true", "continue_final_message")  # fmt: skip
        self._check_tools()
        out: dict[str, Any] = {"add_generation_prompt": self.add_generation_prompt,
                               "continue_final_message": self.continue_final_message}
        if self.tools:
            out["tools"] = self._raw_tools or [t.model_dump(exclude_none=True) for t in self.tools]
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.documents is not None:
            out["documents"] = self.documents
        for key, value in (self.chat_template_kwargs or {}).items():
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise APIError(400, f"chat_template_kwargs may not set {key!r}",
                               f"chat_template_kwargs.{key}")  # fmt: skip
            out[key] = value
        return out

    def echo_prefix(self) -> str:
        """vLLM's chat echo: the last message's content, when the reply continues its role."""
        if not self.echo:
            return ""
        last = self.messages[-1]
        role = "assistant" if self.add_generation_prompt else last.role
        return last.text if last.role == role else ""

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        tools = self.tool_constraint()
        if tools is not None:
            if "structured" in out:
                raise APIError(400, "a required or named tool_choice constrains the reply "
                               f"to tool calls; drop {self.structured_param}",
                               "tool_choice")  # fmt: skip
            out["structured"] = tools
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing: harmless
            raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        return out


# ----- vLLM's tokenizer endpoints --------------------------------------------------------------
class TokenizeRequest(_Schema):
    """POST /tokenize with a prompt."""

    model: str = Field(min_length=1)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatCompletionRequest):
    """POST /tokenize with messages: the prompt a chat request with these fields would get."""

    return_token_strs: bool = False


class DetokenizeRequest(_Schema):
    model: str = Field(min_length=1)
    tokens: list[int]


# Pydantic resolves the forward reference to StreamOptions once it is defined.
for _cls in (_Request, CompletionRequest, ChatCompletionRequest, TokenizeChatRequest):
    _cls.model_rebuild()

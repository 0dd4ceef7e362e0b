"""Tool-call parsers: a model's reply text -> OpenAI ``tool_calls``, whole or streamed.

One parser per chat-template family, as vLLM names them:

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number, text around them is content.
- ``llama3_json`` (Llama 3.1/3.2/3.3): the reply is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``), several separated by ``;``.
- ``mistral``: content, then ``[TOOL_CALLS]`` and either a JSON list of calls or (newer
  tokenizers) ``name[ARGS]{...}`` per call. ``[TOOL_CALLS]`` is a special token, so the reply is
  decoded with special tokens kept (``markers``).

A parser is fed the reply text as it streams and returns *events*: content text, or a
``ToolCall`` once the call is complete (its arguments are then sent in one delta). Held-back
text is only ever a possible start of a marker or an unfinished call, and the whole-reply
result is the concatenation of the streamed events, so streamed and unstreamed replies agree.
Text that does not parse as a call is content, never dropped.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


Event = str | ToolCall  # content text, or a complete call

_DECODER = json.JSONDecoder()


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _arguments(value: Any) -> str:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


class ToolParser:
    """Base: subclasses implement ``_feed`` and ``_finish``."""

    name: ClassVar[str]
    # Special tokens the parser reads: the reply is decoded with special tokens kept, and
    # other special tokens are removed from the text before it is fed.
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.num_calls = 0
        self._space = ""  # trailing whitespace of the content so far, held back

    def new_call(self, name: str, arguments: Any) -> ToolCall:
        self.num_calls += 1
        return ToolCall(name, _arguments(arguments))

    def call_from(self, obj: Any, args_keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
        """A parsed JSON object as a call, or None if it is not shaped like one."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = next((obj[k] for k in args_keys if k in obj), {})
        if not isinstance(args, dict | str):
            return None
        return self.new_call(obj["name"], args)

    def feed(self, text: str) -> list[Event]:
        return self._layout(self._feed(text)) if text else []

    def finish(self) -> list[Event]:
        out = self._layout(self._finish())
        if self._space and not self.num_calls:  # a reply of content only keeps its end
            out.append(self._space)
        self._space = ""
        return out

    def _layout(self, events: list[Event]) -> list[Event]:
        """Whitespace next to calls is layout, not content: the trailing whitespace of content
        is held until more content follows (then sent) or a call does (then dropped)."""
        out: list[Event] = []
        for e in events:
            if isinstance(e, ToolCall):
                self._space = ""
                out.append(e)
                continue
            text = self._space + e
            body = text.rstrip()
            self._space = text[len(body):]
            if body:
                out.append(body)
        return out

    def _feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def _finish(self) -> list[Event]:
        raise NotImplementedError


class _MarkedCalls(ToolParser):
    """Content until ``start``; after it, calls (subclass: ``_calls``)."""

    start: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.inside = False

    def _feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            if not self.inside:
                i = self.buf.find(self.start)
                if i == -1:
                    cut = len(self.buf) - _partial_suffix(self.buf, self.start)
                    out.append(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    return out
                out.append(self.buf[:i])
                self.buf = self.buf[i + len(self.start):]
                self.inside = True
            events, rest = self._calls(self.buf, final=False)
            if rest is None:  # needs more text
                return out
            out += events
            self.buf, self.inside = rest, False

    def _finish(self) -> list[Event]:
        out: list[Event] = []
        if self.inside:
            events, rest = self._calls(self.buf, final=True)
            out += events if rest is not None else [self.start + self.buf]
            if rest:
                out.append(rest)
        elif self.buf:
            out.append(self.buf)
        self.buf, self.inside = "", False
        return out

    def _calls(self, text: str, final: bool) -> tuple[list[Event], str | None]:
        """Parse what follows the start marker: (events, the text after them), or
        (_, None) while incomplete (when ``final``: (_, None) if it is not calls at all)."""
        raise NotImplementedError


class HermesToolParser(_MarkedCalls):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def _calls(self, text: str, final: bool) -> tuple[list[Event], str | None]:
        j = text.find(self.end)
        if j == -1 and not final:
            return [], None
        body, rest = (text[:j], text[j + len(self.end):]) if j != -1 else (text, "")
        try:
            call = self.call_from(json.loads(body))
        except (ValueError, RecursionError):  # a model can nest brackets past json's depth
            call = None
        if call is None:  # not a call after all: the text is content
            return [self.start + body + (self.end if j != -1 else "")], rest
        return [call], rest


class MistralToolParser(_MarkedCalls):
    name = "mistral"
    start = "[TOOL_CALLS]"
    markers = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")

    def new_call(self, name: str, arguments: Any) -> ToolCall:
        call = super().new_call(name, arguments)
        # Mistral's templates require 9-character alphanumeric ids in the history.
        call.id = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return call

    def _calls(self, text: str, final: bool) -> tuple[list[Event], str | None]:
        s = text.lstrip()
        try:
            if s.startswith("["):  # [{"name": ..., "arguments": ...}, ...]
                value, end = _DECODER.raw_decode(s)
                calls = [self.call_from(v) for v in value] if isinstance(value, list) else [None]
            else:  # name[ARGS]{...}, and maybe [CALL_ID]id before [ARGS]
                head, sep, tail = s.partition("[ARGS]")
                if not sep:
                    raise ValueError("no [ARGS] yet")
                name = head.partition("[CALL_ID]")[0].strip()
                args, end = _DECODER.raw_decode(tail)
                end += len(head) + len(sep)
                calls = [self.call_from({"name": name, "arguments": args})]
        except (ValueError, RecursionError):
            return [], None
        if any(c is None for c in calls):
            return ([self.start + text], "") if final else ([], None)
        rest = s[end:]
        # Another call follows its own marker: let the loop find it.
        return calls, rest


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.raw = ""  # everything fed, for when the reply turns out to be content
        self.buf = ""  # not yet parsed
        self.mode: str | None = None  # None: undecided; "calls"; "content"

    def _feed(self, text: str) -> list[Event]:
        self.raw += text
        if self.mode == "content":
            return [text]
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(self.python_tag) or head.startswith("{"):
                self.mode = "calls"
            elif not head or self.python_tag.startswith(head):
                return []
            else:
                self.mode, self.buf = "content", ""
                return [self.raw]
        return self._drain(final=False)

    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            s = self.buf.lstrip().removeprefix(self.python_tag).lstrip(" \t\r\n;")
            if not s:
                self.buf = ""
                return out
            try:
                obj, end = _DECODER.raw_decode(s)
                call = self.call_from(obj, ("parameters", "arguments"))
            except (ValueError, RecursionError):
                if not final:
                    return out
                call, end = None, len(s)
            if call is None:  # not a call: all of the reply is content (or the rest of it)
                self.mode, self.buf = "content", ""
                return out + [self.raw if not self.num_calls else s]
            out.append(call)
            self.buf = s[end:]

    def _finish(self) -> list[Event]:
        if self.mode != "calls":
            out = [self.buf] if self.mode is None and self.buf else []
            self.buf = ""
            return out
        return self._drain(final=True)


class ForcedCallParser(ToolParser):
    """A reply constrained to calls (tool_choice "required" or a named function, see
    protocol.tool_call_schema): JSON, the named function's arguments or a list of
    ``{"name", "parameters"}``, read whole at the end. A reply cut short (max_tokens) does not
    parse and stays content."""

    name = "forced"

    def __init__(self, function: str | None = None) -> None:
        super().__init__()
        self.function = function
        self._text = ""

    @classmethod
    def factory(cls, function: str | None) -> Callable[[], ForcedCallParser]:
        return lambda: cls(function)

    def _feed(self, text: str) -> list[Event]:
        self._text += text
        return []

    def _finish(self) -> list[Event]:
        try:
            value = json.loads(self._text)
        except (ValueError, RecursionError):  # a model can nest brackets past json's depth
            return [self._text] if self._text else []
        if self.function is not None:
            return [self.new_call(self.function, value)]
        calls = [self.call_from(c, ("parameters", "arguments"))
                 for c in (value if isinstance(value, list) else [value])]  # fmt: skip
        if not calls or None in calls:
            return [self._text]
        return calls


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser for a chat template, from the call format its source spells out."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "Environment: ipython" in t:
        return "llama3_json"
    return None


def parse_tool_calls(parser: ToolParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply: its content (None when it is only calls) and its calls."""
    events = parser.feed(text) + parser.finish()
    calls = [e for e in events if isinstance(e, ToolCall)]
    content = "".join(e for e in events if isinstance(e, str))
    return (content or None) if calls else content, calls

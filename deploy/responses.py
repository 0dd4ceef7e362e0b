"""OpenAI response bodies: one choice whole (non-streamed) or as SSE deltas, usage, log-probs.

A ``ChoiceRenderer`` per choice takes the replica's items one at a time; ``feed`` returns the
choice entries of the stream chunks they become, and ``body`` the whole choice once the stream
has ended. Streamed and non-streamed responses go through the same ``feed``, so they cannot
disagree. Nothing here knows of Ray or the engine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .tool_parsers import Event, ToolCall, ToolParser

# The replica's log-prob wire format, (token id, logprob, [(id, logprob), ...]) per token,
# made into entries {"token_id", "token", "logprob", "top": [...]} by the service (it has the
# tokenizer).
LogprobEntries = Callable[[list[tuple]], list[dict[str, Any]]]


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0  # of the tokens whose log-probs the replica sent
    prompt_logprobs: list[dict[str, Any]] | None = None  # entries, from the prompt's 2nd token

    def add(self, item: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        """Append one replica item (``entries``: its log-probs, already made entries)."""
        self.text += item["text"]
        self.token_ids += item["token_ids"]
        self.logprobs += entries
        self.cumulative_logprob += sum(lp for _, lp, _ in item.get("logprobs") or [])
        self.finish_reason = item.get("finish_reason", self.finish_reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_logprobs(entries: list[dict[str, Any]], start: int = 0) -> dict[str, Any] | None:
    """Legacy completions format: parallel lists. ``start``: the text length before these
    tokens (a stream's earlier chunks), so offsets index the whole completion."""
    if not entries:
        return None
    offsets, pos = [], start
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                         for e in entries],
        "text_offset": offsets,
    }


def prompt_logprobs_body(entries: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a dict of
    token id -> {logprob, rank, decoded_token} holding the token and the N best (rank: place
    among the best, None for a token outside them)."""
    out: list[dict[str, Any] | None] = [None]
    for e in entries:
        d = {str(t["token_id"]): {"logprob": t["logprob"], "rank": r + 1,
                                  "decoded_token": t["token"]}
             for r, t in enumerate(e["top"])}  # fmt: skip
        d.setdefault(str(e["token_id"]), {"logprob": e["logprob"], "rank": None,
                                          "decoded_token": e["token"]})  # fmt: skip
        out.append(d)
    return out


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not entries:
        return None

    def item(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"],
                "bytes": list(e["token"].encode())}  # fmt: skip

    return {
        "content": [
            {**item(e), "top_logprobs": [item(t) for t in e["top"]]} for e in entries
        ]
    }


@dataclass
class RenderContext:
    """What every choice of one response shares."""

    model: str
    want_logprobs: bool
    logprob_entries: LogprobEntries
    parallel_tool_calls: bool = True  # false: a reply keeps its first call only


class ToolCalls(Protocol):
    """How a choice reads tool calls from its reply (service.ToolParserFactory)."""

    def __call__(self) -> ToolParser: ...

    def clean(self, text: str) -> str: ...


class ChoiceRenderer:
    """One choice of a response; subclasses give the endpoint's shape."""

    def __init__(self, index: int, ctx: RenderContext, prefix: str = "",
                 tools: ToolCalls | None = None) -> None:  # fmt: skip
        self.state = ChoiceState(index)
        self.ctx = ctx
        self.prefix = prefix  # echo: text the choice starts with, sent with its first delta
        self.tools = tools
        # echo with logprobs: the prompt's entries (the first with logprob None), sent first
        self.echo_entries: list[dict[str, Any]] | None = None
        # prompt_logprobs (vLLM's format), on the choice's first chunk and its body
        self.prompt_logprobs: list[dict[str, Any] | None] | None = None
        self._prompt_logprobs_sent = False

    def _add(self, item: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """Accumulate an item; return its text (behind the echoed prefix, on the first
        item) and its log-prob entries."""
        entries = []
        if self.ctx.want_logprobs and item.get("logprobs"):
            entries = self.ctx.logprob_entries(item["logprobs"])
        text, self.prefix = self.prefix + item["text"], ""
        self.state.add({**item, "text": text}, entries)
        return text, entries

    def feed(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        raise NotImplementedError


class CompletionChoice(ChoiceRenderer):
    def feed(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        # log-prob text offsets count the whole completion, echoed prompt included
        start = len(self.state.text) + len(self.prefix)
        echo, self.echo_entries = self.echo_entries or [], None
        if echo:
            self.state.logprobs += echo
            start = 0
        text, entries = self._add(item)
        lp = completion_logprobs(echo + entries, start) if self.ctx.want_logprobs else None
        out = {"index": self.state.index, "text": text, "logprobs": lp,
               "finish_reason": item.get("finish_reason")}  # fmt: skip
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            self._prompt_logprobs_sent = True
            out["prompt_logprobs"] = self.prompt_logprobs
        return [out]

    def body(self) -> dict[str, Any]:
        c = self.state
        out = {
            "index": c.index,
            "text": c.text,
            "logprobs": completion_logprobs(c.logprobs) if self.ctx.want_logprobs else None,
            "finish_reason": c.finish_reason,
        }
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        return out


class ReplyReader:
    """A choice's reply text as events: content, and each tool call once it is complete. With
    no ``tools`` the text is all content; with ``parallel`` false, calls after the first are
    dropped."""

    def __init__(self, tools: ToolCalls | None, parallel: bool = True) -> None:
        self.tools = tools
        self.parser = tools() if tools is not None else None
        self.parallel = parallel
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool) -> list[Event]:
        if self.parser is None or self.tools is None:
            return [text] if text else []
        events = self.parser.feed(self.tools.clean(text))
        if final:
            events += self.parser.finish()
        out: list[Event] = []
        for e in events:
            if isinstance(e, ToolCall):
                if not self.parallel and self.calls:
                    continue
                self.calls.append(e)
            out.append(e)
        return out


def finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI's: a reply that stopped after calling tools finished for "tool_calls"."""
    return "tool_calls" if reason == "stop" and calls else reason


class ChatChoice(ChoiceRenderer):
    """A chat choice; with ``tools``, calls in the reply become ``tool_calls`` (streamed as
    OpenAI does: a delta with the call's id, type and name, then one with its arguments)."""

    def __init__(self, index: int, ctx: RenderContext, prefix: str = "",
                 tools: ToolCalls | None = None) -> None:  # fmt: skip
        super().__init__(index, ctx, prefix, tools)
        self.started = False
        self.reader = ReplyReader(tools, ctx.parallel_tool_calls)
        self.content = ""  # the reply's text that is not calls

    def feed(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        i = self.state.index
        if not self.started:  # OpenAI opens each choice with its role
            self.started = True
            # A reply that may be only tool calls has no content until some arrives.
            role = {"role": "assistant"} if self.tools else {"role": "assistant", "content": ""}
            out.append({"index": i, "delta": role, "logprobs": None, "finish_reason": None})
        text, entries = self._add(item)
        lp = chat_logprobs(entries) if self.ctx.want_logprobs else None
        reason = item.get("finish_reason")
        deltas = self._deltas(self.reader.feed(text, final=reason is not None))
        reason = self._finish_reason(reason)
        deltas = deltas or [{}]
        last = len(deltas) - 1
        out += [{"index": i, "delta": d, "logprobs": lp if k == 0 else None,
                 "finish_reason": reason if k == last else None}
                for k, d in enumerate(deltas)]  # fmt: skip
        return out

    def _deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, str):
                self.content += e
                out.append({"content": e})
            else:
                k = self.reader.calls.index(e)
                out.append({"tool_calls": [{"index": k, "id": e.id, "type": "function",
                                            "function": {"name": e.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": k,
                                            "function": {"arguments": e.arguments}}]})
        return out

    def _finish_reason(self, reason: str | None) -> str | None:
        return finish_reason(reason, self.reader.calls)

    def body(self) -> dict[str, Any]:
        c = self.state
        calls = self.reader.calls
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if self.tools is not None:
            message["content"] = (self.content or None) if calls else self.content
            if calls:
                message["tool_calls"] = [call.as_openai() for call in calls]
        return {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(c.logprobs) if self.ctx.want_logprobs else None,
            "finish_reason": self._finish_reason(c.finish_reason),
        }


@dataclass(frozen=True)
class ResponseShape:
    """The envelope of an endpoint's responses."""

    object: str  # non-streamed body
    chunk_object: str  # streamed chunks
    id_prefix: str
    choice: type[ChoiceRenderer]

    def body(self, rid: str, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
        return {"id": rid, "object": self.object, "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage}  # fmt: skip

    def chunk(self, rid: str, model: str, created: int, choices: list[dict],
              usage: dict | None = None) -> dict[str, Any]:  # fmt: skip
        out = {"id": rid, "object": self.chunk_object, "created": created, "model": model,
               "choices": choices}  # fmt: skip
        if usage is not None:
            out["usage"] = usage
        return out


COMPLETION = ResponseShape("text_completion", "text_completion", "cmpl", CompletionChoice)
CHAT = ResponseShape("chat.completion", "chat.completion.chunk", "chatcmpl", ChatChoice)

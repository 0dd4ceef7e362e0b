"""``segserve client``: send one prompt to a running segserve deployment.

    segserve client --prompt "Hello" --max-tokens 16 --stream           # gRPC, localhost:9000
    segserve client --http http://localhost:8000 --chat --prompt "Hi"   # OpenAI-compatible HTTP

The HTTP path uses only the standard library and grpc is imported only on the gRPC path, so
``segserve generate`` and ``--http`` work without grpcio installed. Failures print one line to
stderr and exit 1 (no traceback): this is a command for people at a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, Any

from .cli import DEFAULT_MODEL  # stdlib-only at import, like this module

DEFAULT_GRPC_TARGET = "localhost:9000"
API_KEY_ENV = "SEGSERVE_API_KEY"


class ClientError(Exception):
    """A failure to report as one line (server error, unreachable server, bad reply)."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``client`` on the ``segserve`` subcommand parsers."""
    p = sub.add_parser("client", parents=[common], help="query a running segserve deployment",
                       description="Send one prompt to a segserve deployment over gRPC "
                                   f"(default: --grpc {DEFAULT_GRPC_TARGET}) or HTTP and print "
                                   "the generated text.")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--grpc", metavar="HOST:PORT",
                        help=f"gRPC address of Ray Serve's gRPC proxy (default: "
                             f"{DEFAULT_GRPC_TARGET})")
    target.add_argument("--http", metavar="URL",
                        help="base URL of the OpenAI-compatible HTTP API, e.g. "
                             "http://localhost:8000")
    p.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                   help="the prompt; several --prompt are one batched request (not with "
                        "--chat): prompt i's choices are numbered i * n + j")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the chat template")
    p.add_argument("--tools", metavar="JSON|@FILE", default=None,
                   help="with --chat: OpenAI-format tools (a JSON list, or @FILE holding one); "
                        "calls in the reply are printed as '[tool call] NAME ARGUMENTS'")
    p.add_argument("--tool-choice", metavar="MODE|NAME", default=None,
                   help="with --tools: none, auto, required, or the name of the function to "
                        "call")
    p.add_argument("--json-schema", metavar="JSON|@FILE", default=None,
                   help="constrain the reply to JSON following this schema")
    p.add_argument("--regex", default=None, help="constrain the reply to this regular expression")
    p.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="the reply is exactly one of the --choice texts (repeat it)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="generate at least this many tokens before EOS may end the reply")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model id (default: {DEFAULT_MODEL}, what `segserve serve` serves)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="choices to generate")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default=None,
                   help="which pool may serve the request (default: auto)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    # Not read from the environment here: a default would show up in namespaces and logs.
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this long (default: wait)")
    p.add_argument("--json", action="store_true",
                   help="print the replies as JSON, one object per line (per chunk with "
                        "--stream)")
    p.set_defaults(func=cmd_client)
    return p


def _load_tools(spec: str | None) -> list[dict[str, Any]] | None:
    if spec is None:
        return None
    try:
        if spec.startswith("@"):
            with open(spec[1:], encoding="utf-8") as f:
                spec = f.read()
        tools = json.loads(spec)
    except (OSError, ValueError) as e:
        raise ClientError(f"--tools: {e}") from None
    if not isinstance(tools, list):
        raise ClientError("--tools must be a JSON list of tools")
    return tools


def _structured(args: argparse.Namespace) -> dict[str, Any] | None:
    """--json-schema / --regex / --choice as one {kind: value} (SamplingParams.structured)."""
    given = {k: v for k, v in (("json", args.json_schema), ("regex", args.regex),
                               ("choice", args.choice)) if v is not None}  # fmt: skip
    if len(given) > 1:
        raise ClientError("give one of --json-schema, --regex and --choice")
    if "json" in given:
        spec = given["json"]
        try:
            if spec.startswith("@"):
                with open(spec[1:], encoding="utf-8") as f:
                    spec = f.read()
            given["json"] = json.loads(spec)
        except (OSError, ValueError) as e:
            raise ClientError(f"--json-schema: {e}") from None
    return given or None


def _tool_choice(choice: str | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _call_text(name: str, arguments: str) -> str:
    return f"\n[tool call] {name} {arguments}"


def cmd_client(args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    out = sys.stdout  # looked up per call: tests (and embedding code) swap sys.stdout
    try:
        if args.chat and len(args.prompt) > 1:
            raise ClientError("--chat takes one --prompt")
        if (args.tools or args.tool_choice) and not args.chat:
            raise ClientError("--tools and --tool-choice go with --chat")
        args.tools = _load_tools(args.tools)
        args.structured = _structured(args)
        if args.http is not None:
            _run_http(args, api_key, out)
        else:
            _run_grpc(args, api_key, out)
    except ClientError as e:
        out.flush()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


class _ChoicePrinter:
    """Prints streamed choices. Choice 0 is printed live; with ``n > 1`` the others are buffered
    and printed after it, each under a header, since interleaved deltas would be unreadable."""

    def __init__(self, out: IO[str], several: bool) -> None:
        self.out = out
        self.later: dict[int, list[str]] = {}
        self.wrote = False
        self.started = False  # choice 0 has printed some of its text
        if several:
            self._write("=== choice 0 ===\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.wrote = True

    def add(self, index: int, text: str) -> None:
        if index == 0:
            if text:
                # a reply that opens with a tool call starts its line with it
                self._write(text.removeprefix("\n") if not self.started else text)
                self.started = True
        else:
            self.later.setdefault(index, []).append(text)

    def finish(self, failed: bool = False) -> None:
        # A stream that failed before any text leaves stdout empty; otherwise end choice 0's
        # line, as the non-streamed output does.
        if not failed or self.wrote:
            self._write("\n")
        for index in sorted(self.later):
            text = "".join(self.later[index]).removeprefix("\n")
            self._write(f"=== choice {index} ===\n{text}\n")


def _print_choices(out: IO[str], texts: list[tuple[int, str]]) -> None:
    several = len(texts) > 1
    for index, text in sorted(texts):
        if several:
            out.write(f"=== choice {index} ===\n")
        out.write(text.removeprefix("\n") + "\n")
    out.flush()


def _print_stream(out: IO[str], chunks: Iterator[list[tuple[int, str]]], n: int | None) -> None:
    """Print ``(choice index, new text)`` lists as they arrive. What arrived before an error is
    still printed (the error line follows on stderr)."""
    printer = _ChoicePrinter(out, several=(n or 1) > 1)
    try:
        for deltas in chunks:
            for index, text in deltas:
                printer.add(index, text)
    except BaseException:
        printer.finish(failed=True)
        raise
    printer.finish()


# ----- HTTP ------------------------------------------------------------------------------------
def _http_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model}
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt[0]}]
    else:
        body["prompt"] = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    for name in ("max_tokens", "temperature", "seed", "n", "device", "tools", "min_tokens"):
        value = getattr(args, name)
        if value is not None:  # unset: the server's default, as with the gRPC client
            body[name] = value
    if args.structured is not None:
        body["structured_outputs"] = args.structured
    if args.tool_choice is not None:
        body["tool_choice"] = _tool_choice(args.tool_choice)
    if args.stream:
        body["stream"] = True
    return body


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except OSError:
        raw = b""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    message = ""
    if isinstance(data, dict):
        err = data.get("error") or data.get("detail")  # OpenAI's shape, then FastAPI's
        message = str(err.get("message", "")) if isinstance(err, dict) else str(err or "")
    elif raw.strip():  # a proxy's plain-text or HTML error page: its first line
        message = raw.decode("utf-8", "replace").strip().splitlines()[0][:200]
    return f"HTTP {e.code}: {message or e.reason}"


def _choice_text(choice: dict[str, Any], chat: bool, stream: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if stream else "message") or {}
    text = part.get("content") or ""  # the first chat delta carries only the role
    for call in part.get("tool_calls") or []:
        f = call.get("function") or {}
        if "id" in call:  # a whole call, or a streamed call's first delta: it names the call
            text += _call_text(f.get("name", ""), "")
        text += f.get("arguments") or ""  # streamed: the arguments follow in a later delta
    return text


def _sse_events(resp: Any) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream's ``data:`` lines, until ``data: [DONE]``."""
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, event:/id: fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise ClientError(f"bad stream event from the server: {data[:200]!r}") from None
        if "error" in event:  # an error after the 200 status line arrives as an event
            err = event["error"]
            raise ClientError(err.get("message", str(err)) if isinstance(err, dict) else err)
        yield event


def _run_http(args: argparse.Namespace, api_key: str | None, out: IO[str]) -> None:
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    url = args.http.rstrip("/") + path
    headers = {"Content-Type": "application/json",
               "Accept": "text/event-stream" if args.stream else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(_http_body(args)).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            if args.stream:
                events = _sse_events(resp)
                if args.json:
                    for event in events:
                        print(json.dumps(event), file=out, flush=True)
                else:
                    _print_stream(out, ([(c.get("index", 0), _choice_text(c, args.chat, True))
                                         for c in event.get("choices", [])]
                                        for event in events), _num_choices(args))
            else:
                reply = json.loads(resp.read())
                if args.json:
                    print(json.dumps(reply), file=out, flush=True)
                else:
                    _print_choices(out, [(c.get("index", 0), _choice_text(c, args.chat, False))
                                         for c in reply.get("choices", [])])
    except urllib.error.HTTPError as e:
        raise ClientError(_http_error_message(e)) from None
    except urllib.error.URLError as e:
        # HTTPError is a URLError too, hence the order; this one never reached a server.
        reason = e.reason
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused"
        raise ClientError(f"cannot reach {args.http}: {reason}") from None
    except TimeoutError:  # socket.timeout is this class
        raise ClientError(f"no reply from {args.http} within {args.timeout} s") from None
    except ConnectionError as e:  # the server went away mid-reply
        raise ClientError(f"connection to {args.http} lost: {e}") from None
    except ValueError:
        raise ClientError(f"the reply from {url} is not JSON") from None


# ----- gRPC ------------------------------------------------------------------------------------
def _run_grpc(args: argparse.Namespace, api_key: str | None, out: IO[str]) -> None:
    try:
        import grpc
        from google.protobuf import json_format
        from segserve.proto.client import SegServeClient
    except ImportError as e:
        raise ClientError(f"gRPC needs grpcio and protobuf ({e}); install them or use --http") \
            from None

    target = args.grpc or DEFAULT_GRPC_TARGET
    kwargs: dict[str, Any] = {"model": args.model, "device": args.device or "auto",
                              "max_tokens": args.max_tokens, "temperature": args.temperature,
                              "seed": args.seed, "n": args.n, "min_tokens": args.min_tokens,
                              "structured": args.structured}
    if args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt[0]}]
        kwargs.update(tools=args.tools, tool_choice=_tool_choice(args.tool_choice))
    else:
        kwargs["prompt"] = args.prompt[0] if len(args.prompt) == 1 else args.prompt

    def text(c: Any) -> str:
        return c.text + "".join(_call_text(t.name, t.arguments) for t in c.tool_calls)

    def as_json(message: Any) -> str:
        return json.dumps(json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))

    try:
        with SegServeClient(target, api_key=api_key, timeout=args.timeout) as client:
            if args.stream:
                stream = client.generate_stream(**kwargs)
                if args.json:
                    for reply in stream:
                        print(as_json(reply), file=out, flush=True)
                else:
                    _print_stream(out, ([(c.index, text(c)) for c in reply.choices]
                                        for reply in stream), _num_choices(args))
            else:
                reply = client.generate(**kwargs)
                if args.json:
                    print(as_json(reply), file=out, flush=True)
                else:
                    _print_choices(out, [(c.index, text(c)) for c in reply.choices])
    except grpc.RpcError as e:
        code = e.code()
        details = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
            raise ClientError(f"cannot reach {target}: {details}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ClientError(f"no reply from {target} within {args.timeout} s") from None
        name = code.name if code is not None else "UNKNOWN"
        raise ClientError(f"gRPC {name}: {details}") from None


def _num_choices(args: argparse.Namespace) -> int:
    return (args.n or 1) * len(args.prompt)


def _is_connect_failure(details: str) -> bool:
    # UNAVAILABLE also means "no replica could take it" from the server; only a failed connect
    # is worth the "cannot reach" wording.
    lowered = details.lower()
    return any(s in lowered for s in ("failed to connect", "connection refused",
                                      "dns resolution failed", "connect failed"))

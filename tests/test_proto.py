"""The gRPC stubs, ``SegServeClient`` and ``segserve client``, against in-process fakes.

The fake gRPC servicer echoes what it received (request fields, which sampling fields are
present, metadata) as JSON in the response text, so the tests see exactly what went over the
wire. The fake HTTP server serves canned OpenAI-style replies. No Ray, no engine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from google.protobuf import json_format  # noqa: E402
from segserve.deploy.cli import main  # noqa: E402
from segserve.proto import segserve_pb2, segserve_pb2_grpc  # noqa: E402
from segserve.proto.client import SegServeClient  # noqa: E402
from segserve.proto.generate import OUTPUTS, PROTO_DIR, generate  # noqa: E402

API_KEY = "secret-key"
TOOL_CALL = segserve_pb2.ToolCall(id="call_1", type="function", name="get_weather",
                                  arguments='{"city": "Paris"}')
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object"}}}


@pytest.fixture(autouse=True)
def _no_ambient_api_key(monkeypatch):
    # A developer's own SEGSERVE_API_KEY must not leak into the CLI tests.
    monkeypatch.delenv("SEGSERVE_API_KEY", raising=False)


# ----- generated stubs -------------------------------------------------------------------------
def test_generated_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    written = generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(OUTPUTS)
    for path in written:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run python -m segserve.proto.generate"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.name} is stale (segserve.proto or grpcio-tools changed): "
            "run python -m segserve.proto.generate and commit the result")


def test_stubs_import_as_a_package_and_cli_import_needs_no_grpc():
    # Ray Serve's gRPC proxy imports the servicer adder by dotted path in its own process.
    assert callable(segserve_pb2_grpc.add_SegServeServicer_to_server)
    code = ("import sys; import segserve.deploy.cli as c; c.build_parser(); "
            "import segserve.proto; "
            "assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----- fake gRPC server ------------------------------------------------------------------------
class EchoServicer(segserve_pb2_grpc.SegServeServicer):
    """Choice 0's text is a JSON echo of the request; other choices say their index.

    Prompts drive failures: "fail" aborts with INVALID_ARGUMENT before any output, "fail-mid"
    streams one delta and then aborts.
    """

    def _check(self, context: grpc.ServicerContext) -> dict[str, str]:
        metadata = dict(context.invocation_metadata())
        auth = metadata.get("authorization")
        if auth is not None and auth != f"Bearer {API_KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        return {k: v for k, v in metadata.items() if k in ("authorization", "application")}

    @staticmethod
    def _echo(request: segserve_pb2.GenerateRequest, metadata: dict[str, str]) -> str:
        return json.dumps({
            "model": request.model,
            "prompt": request.prompt,
            "prompt_token_ids": list(request.prompt_token_ids),
            "messages": [[m.role, m.content] for m in request.messages],
            "device": request.device,
            # ListFields lists exactly the fields present on the wire.
            "present": sorted(f.name for f, _ in request.sampling.ListFields()),
            "sampling": json_format.MessageToDict(request.sampling,
                                                  preserving_proto_field_name=True),
            "metadata": metadata,
            "request": json_format.MessageToDict(request, preserving_proto_field_name=True),
        }, sort_keys=True)

    @staticmethod
    def _calls_tools(request: segserve_pb2.GenerateRequest) -> bool:
        return any(m.content == "call tools" for m in request.messages)

    @staticmethod
    def _n(request: segserve_pb2.GenerateRequest) -> int:
        return request.sampling.n if request.sampling.HasField("n") else 1

    def Generate(self, request, context):  # noqa: N802 (the gRPC method name)
        metadata = self._check(context)
        if request.prompt == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1")
        if self._calls_tools(request):
            return segserve_pb2.GenerateResponse(choices=[segserve_pb2.Choice(
                index=0, text="Let me see.", finish_reason="tool_calls", tool_calls=[TOOL_CALL])])
        choices = [segserve_pb2.Choice(index=0, text=self._echo(request, metadata),
                                       finish_reason="stop")]
        choices += [segserve_pb2.Choice(index=i, text=f"choice {i}", finish_reason="stop")
                    for i in range(1, self._n(request))]
        return segserve_pb2.GenerateResponse(id="req-1", model=request.model, choices=choices,
                                             pool="cpu")

    def GenerateStream(self, request, context):  # noqa: N802
        self._check(context)
        if request.prompt == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1")
        if self._calls_tools(request):
            yield segserve_pb2.GenerateResponse(choices=[segserve_pb2.Choice(index=0,
                                                                             text="Let me see.")])
            yield segserve_pb2.GenerateResponse(choices=[segserve_pb2.Choice(
                index=0, finish_reason="tool_calls", tool_calls=[TOOL_CALL])])
            return
        words = (request.prompt or " ".join(request.prompts) or "chat reply").split(" ")
        for k, word in enumerate(words):
            text = word if k == 0 else " " + word
            yield segserve_pb2.GenerateResponse(
                id="req-1", choices=[segserve_pb2.Choice(index=i, text=f"{text}{i or ''}")
                                     for i in range(self._n(request))])
            if request.prompt == "fail-mid":
                context.abort(grpc.StatusCode.INTERNAL, "engine step failed")
        yield segserve_pb2.GenerateResponse(
            id="req-1", choices=[segserve_pb2.Choice(index=i, finish_reason="stop")
                                 for i in range(self._n(request))],
            usage=segserve_pb2.Usage(prompt_tokens=3, completion_tokens=len(words),
                                     total_tokens=3 + len(words)))

    def ListModels(self, request, context):  # noqa: N802
        self._check(context)
        return segserve_pb2.ListModelsResponse(
            models=[segserve_pb2.ModelInfo(id="demo", pools=["cpu"], max_model_len=512)])

    def Health(self, request, context):  # noqa: N802
        return segserve_pb2.HealthResponse(status="ok")


@pytest.fixture(scope="module")
def grpc_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    segserve_pb2_grpc.add_SegServeServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(grpc_target) -> Iterator[SegServeClient]:
    with SegServeClient(grpc_target, api_key=API_KEY, timeout=10) as c:
        yield c


def echo_of(response: segserve_pb2.GenerateResponse) -> dict[str, Any]:
    return json.loads(response.choices[0].text)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- SegServeClient --------------------------------------------------------------------------
def test_generate_marshals_sampling_and_presence(client):
    echo = echo_of(client.generate(
        "hello", model="m1", device="cpu", max_tokens=7, temperature=0.0, top_p=0.5, seed=3,
        stop="END", stop_token_ids=[5, 6], early_stopping="never", ignore_eos=False))
    assert echo["model"] == "m1" and echo["prompt"] == "hello" and echo["device"] == "cpu"
    # Zero / False values are present: presence, not the value, tells the server they were set.
    assert echo["present"] == sorted(["max_tokens", "temperature", "top_p", "seed", "stop",
                                      "stop_token_ids", "early_stopping", "ignore_eos"])
    s = echo["sampling"]
    assert s["max_tokens"] == 7 and s["temperature"] == 0.0 and s["top_p"] == 0.5
    assert s["seed"] == "3"  # int64 is a string in proto JSON
    assert s["stop"] == ["END"] and s["stop_token_ids"] == [5, 6]
    assert s["early_stopping"] == "never" and s["ignore_eos"] is False


def test_generate_defaults_send_nothing_optional(client):
    echo = echo_of(client.generate("hi", temperature=None))
    assert echo["present"] == []
    assert echo["model"] == "demo" and echo["device"] == "auto"
    assert echo["metadata"] == {"authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("value, sent", [(True, "true"), (False, "false"), ("never", "never")])
def test_early_stopping_is_sent_as_string(client, value, sent):
    assert echo_of(client.generate("x", early_stopping=value))["sampling"]["early_stopping"] \
        == sent


def test_messages_and_token_ids(client):
    echo = echo_of(client.generate(messages=[{"role": "user", "content": "hi"},
                                             segserve_pb2.ChatMessage(role="assistant",
                                                                      content="yo")]))
    assert echo["messages"] == [["user", "hi"], ["assistant", "yo"]] and echo["prompt"] == ""
    assert echo_of(client.generate(prompt_token_ids=[1, 2, 3]))["prompt_token_ids"] == [1, 2, 3]


def test_bad_arguments_raise_before_sending(client):
    with pytest.raises(TypeError, match="temprature"):
        client.generate("x", temprature=0.5)
    with pytest.raises(TypeError, match="temprature"):
        client.generate_stream("x", temprature=0.5)  # at the call, not at the first next()
    with pytest.raises(ValueError, match="early_stopping"):
        client.generate("x", early_stopping="sometimes")
    with pytest.raises(ValueError, match="exactly one"):
        client.generate("x", prompt_token_ids=[1])
    with pytest.raises(ValueError, match="exactly one"):
        client.generate()


def test_stream(client):
    replies = list(client.generate_stream("one two three", n=2))
    text = {0: "", 1: ""}
    for r in replies[:-1]:
        for c in r.choices:
            text[c.index] += c.text
    assert text == {0: "one two three", 1: "one1 two1 three1"}
    assert [c.finish_reason for c in replies[-1].choices] == ["stop", "stop"]
    assert replies[-1].usage.completion_tokens == 3


def test_metadata_application_and_no_key(grpc_target):
    with SegServeClient(grpc_target, application="llm") as c:
        assert echo_of(c.generate("x"))["metadata"] == {"application": "llm"}


def test_errors_surface_as_rpc_error(client, grpc_target):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("fail")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "max_tokens must be >= 1"

    stream = client.generate_stream("fail-mid")
    assert next(stream).choices[0].text == "fail-mid"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INTERNAL

    with SegServeClient(grpc_target, api_key="wrong") as c, pytest.raises(grpc.RpcError) as info:
        c.generate("x")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_list_models_and_health(client):
    assert [m.id for m in client.list_models().models] == ["demo"]
    assert client.health().status == "ok"


def test_lazy_export():
    import segserve.proto

    assert segserve.proto.SegServeClient is SegServeClient


# ----- segserve client --grpc ------------------------------------------------------------------
def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["client", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_grpc_sends_flags(capsys, grpc_target, monkeypatch):
    monkeypatch.setenv("SEGSERVE_API_KEY", API_KEY)
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "hi", "--model", "m2",
                                    "--max-tokens", "5", "--temperature", "0", "--seed", "1",
                                    "--device", "gpu"])
    assert rc == 0, err
    echo = json.loads(out)
    assert echo["prompt"] == "hi" and echo["model"] == "m2" and echo["device"] == "gpu"
    assert echo["present"] == ["max_tokens", "seed", "temperature"]
    assert echo["metadata"] == {"authorization": f"Bearer {API_KEY}"}  # from the environment


def test_cli_grpc_chat_and_n(capsys, grpc_target):
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "hi", "--chat",
                                    "--n", "2"])
    assert rc == 0, err
    head, first, second, text = out.splitlines()
    assert head == "=== choice 0 ===" and second == "=== choice 1 ===" and text == "choice 1"
    assert json.loads(first)["messages"] == [["user", "hi"]]


def test_cli_grpc_stream(capsys, grpc_target):
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "one two three",
                                    "--stream"])
    assert (rc, out) == (0, "one two three\n"), err
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "a b", "--stream",
                                    "--n", "2"])
    assert (rc, out) == (0, "=== choice 0 ===\na b\n=== choice 1 ===\na1 b1\n"), err
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "a b", "--stream",
                                    "--json"])
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["choices"][0]["text"] for line in lines] == ["a", " b", ""]
    assert lines[-1]["usage"]["completion_tokens"] == 2


def test_cli_grpc_errors(capsys, grpc_target):
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "fail"])
    assert rc == 1 and out == ""
    assert err == "error: gRPC INVALID_ARGUMENT: max_tokens must be >= 1\n"

    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "fail", "--stream"])
    assert (rc, out) == (1, "") and err == "error: gRPC INVALID_ARGUMENT: max_tokens must be >= 1\n"

    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "fail-mid", "--stream"])
    assert rc == 1 and out == "fail-mid\n"  # what arrived is kept
    assert err == "error: gRPC INTERNAL: engine step failed\n"

    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "x", "--api-key", "no"])
    assert rc == 1 and err.startswith("error: gRPC UNAUTHENTICATED")

    target = f"127.0.0.1:{closed_port()}"
    rc, out, err = run_cli(capsys, ["--grpc", target, "--prompt", "x", "--timeout", "5"])
    assert rc == 1 and err.startswith(f"error: cannot reach {target}") and err.count("\n") == 1


# ----- segserve client --http ------------------------------------------------------------------
class FakeOpenAI(BaseHTTPRequestHandler):
    """Canned replies. Prompt "bad" gets a 400 with an OpenAI-style error body; the requests
    received are kept in ``server.requests``."""

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(  # type: ignore[attr-defined]
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        chat = self.path == "/v1/chat/completions"
        if body.get("prompt") == "bad":
            error = {"error": {"message": "max_tokens must be >= 1",
                               "type": "invalid_request_error", "code": 400}}
            return self._send(400, json.dumps(error).encode(), "application/json")
        if body.get("tools"):
            return self._send_tool_call(body.get("stream"))
        pieces = ["Hel", "lo", " world"]
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}}
                      if chat else {"index": 0, "text": "".join(pieces)})
            return self._send(200, json.dumps({"choices": [choice]}).encode(),
                              "application/json")
        if chat:
            chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
            chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
        else:
            chunks = [{"choices": [{"index": 0, "text": p}]} for p in pieces]
        chunks.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks]
        events.insert(1, ": keep-alive\n\n")
        events.append("data: [DONE]\n\n")
        self._send(200, "".join(events).encode(), "text/event-stream")


    def _send_tool_call(self, stream: bool) -> None:
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        if not stream:
            message = {"role": "assistant", "content": "Let me see.", "tool_calls": [call]}
            body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
            return self._send(200, json.dumps(body).encode(), "application/json")
        deltas = [{"role": "assistant"}, {"content": "Let me see."},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}]
        events = [f"data: {json.dumps({'choices': [{'index': 0, 'delta': d}]})}\n\n"
                  for d in deltas]
        self._send(200, ("".join(events) + "data: [DONE]\n\n").encode(), "text/event-stream")


@pytest.fixture(scope="module")
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def test_cli_http_stream(capsys, http_server):
    http_server.requests.clear()
    rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--prompt", "hi",
                                    "--stream", "--max-tokens", "3", "--device", "cpu",
                                    "--api-key", "k"])
    assert (rc, out) == (0, "Hello world\n"), err
    (req,) = http_server.requests
    assert req["path"] == "/v1/completions" and req["auth"] == "Bearer k"
    # No --model: the client names what `segserve serve` serves by default.
    assert req["body"] == {"model": "smollm2", "prompt": "hi", "max_tokens": 3, "device": "cpu",
                           "stream": True}

    rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--prompt", "hi",
                                    "--stream", "--chat"])
    assert (rc, out) == (0, "Hello world\n"), err
    req = http_server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] is None
    assert req["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_cli_http_non_stream(capsys, http_server):
    for extra in ([], ["--chat"]):
        rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--prompt", "hi",
                                        *extra])
        assert (rc, out) == (0, "Hello world\n"), err


def test_cli_http_errors(capsys, http_server):
    for extra in ([], ["--stream"]):
        rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--prompt", "bad",
                                        *extra])
        assert (rc, out) == (1, "")
        assert err == "error: HTTP 400: max_tokens must be >= 1\n"
    url = f"http://127.0.0.1:{closed_port()}"
    rc, out, err = run_cli(capsys, ["--http", url, "--prompt", "x"])
    assert (rc, out, err) == (1, "", f"error: cannot reach {url}: connection refused\n")


def test_cli_help_lists_client(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "client" in capsys.readouterr().out


# ----- batches and tools -----------------------------------------------------------------------
def test_generate_request_batches_tools_and_history():
    from segserve.proto.client import generate_request

    r = generate_request(["a", "b c"], model="m")
    assert list(r.prompts) == ["a", "b c"] and not r.prompt
    r = generate_request(prompt_token_ids=[[1, 2], [3]])
    assert [list(t.ids) for t in r.prompt_token_id_lists] == [[1, 2], [3]]
    assert list(generate_request(prompt_token_ids=[4, 5]).prompt_token_ids) == [4, 5]
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "content": "18 C", "tool_call_id": "c1"}]
    r = generate_request(messages=history, tools=[WEATHER], tool_choice="required",
                         parallel_tool_calls=False)
    assert [(m.role, m.content, m.tool_call_id) for m in r.messages] == [
        ("user", "hi", ""), ("assistant", "", ""), ("tool", "18 C", "c1")]
    (call,) = r.messages[1].tool_calls
    assert (call.id, call.type, call.name, call.arguments) == ("c1", "function",
                                                               "get_weather", "{}")
    (tool,) = r.tools
    assert (tool.name, tool.description, json.loads(tool.parameters)) == (
        "get_weather", "Weather", {"type": "object"})
    assert r.tool_choice.mode == "required" and r.parallel_tool_calls is False
    named = generate_request(messages=history, tool_choice={"type": "function",
                                                            "function": {"name": "f"}})
    assert named.tool_choice.WhichOneof("choice") == "function"
    assert named.tool_choice.function == "f" and not named.HasField("parallel_tool_calls")


def test_cli_grpc_batch(capsys, grpc_target):
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "a", "--prompt", "b",
                                    "--json"])
    assert rc == 0, err
    assert json.loads(json.loads(out)["choices"][0]["text"])["request"]["prompts"] == ["a", "b"]
    rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--prompt", "a", "--prompt", "b",
                                    "--stream"])
    assert (rc, out) == (0, "=== choice 0 ===\na b\n"), err


def test_cli_grpc_tools(capsys, grpc_target, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    for extra in ([], ["--stream"]):
        rc, out, err = run_cli(capsys, ["--grpc", grpc_target, "--chat", "--prompt",
                                        "call tools", "--tools", f"@{tools}",
                                        "--tool-choice", "get_weather", *extra])
        assert (rc, out) == (0, 'Let me see.\n[tool call] get_weather {"city": "Paris"}\n'), err


def test_cli_http_batch_and_tools(capsys, http_server):
    http_server.requests.clear()
    rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--prompt", "a",
                                    "--prompt", "b"])
    assert rc == 0, err
    assert http_server.requests[-1]["body"]["prompt"] == ["a", "b"]
    for extra in ([], ["--stream"]):
        rc, out, err = run_cli(capsys, ["--http", http_url(http_server), "--chat", "--prompt",
                                        "x", "--tools", json.dumps([WEATHER]),
                                        "--tool-choice", "required", *extra])
        assert (rc, out) == (0, 'Let me see.\n[tool call] get_weather {"city": "Paris"}\n'), err
        body = http_server.requests[-1]["body"]
        assert body["tools"] == [WEATHER] and body["tool_choice"] == "required"


@pytest.mark.parametrize("argv, message", [
    (["--chat", "--prompt", "a", "--prompt", "b"], "--chat takes one --prompt"),
    (["--prompt", "a", "--tools", "[]"], "--tools and --tool-choice go with --chat"),
    (["--chat", "--prompt", "a", "--tools", "{not json"], "--tools: "),
    (["--chat", "--prompt", "a", "--tools", "{}"], "--tools must be a JSON list"),
])  # fmt: skip
def test_cli_tool_and_batch_misuse(capsys, argv, message):
    rc, out, err = run_cli(capsys, ["--http", "http://127.0.0.1:9", *argv])
    assert rc == 1 and out == "" and err.startswith(f"error: {message}")


# ----- the proxy's streaming handlers (proto/servicer.py) ------------------------------------
class _FakeContext:
    """What Serve's handler sees of an RPC: its peer and status, and the RPC's end."""

    def __init__(self, metadata: tuple = (("application", "segserve"),)) -> None:
        self.codes: list[Any] = []
        self.details: list[str] = []
        self.metadata = metadata
        self._done: list[Any] = []

    def peer(self) -> str:
        return "ipv4:10.0.0.1:5555"

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def set_code(self, code: Any) -> None:
        self.codes.append(code)

    def set_details(self, details: str) -> None:
        self.details.append(details)

    def add_done_callback(self, fn: Any) -> None:
        self._done.append(fn)

    def end(self) -> None:  # gRPC ends the RPC (the client cancelled) and runs the callbacks
        for fn in self._done:
            fn(self)


def test_a_stream_cancelled_while_its_item_is_written_cancels_the_replica_call():
    """Serve's proxy handler (faked: it awaits the replica between items, and after a cancel reads
    the peer and sets the status, as Serve 2.60's does) runs under _mend_serve_handlers. The RPC
    ends while the consumer holds an item (gRPC writing it), and the generator is never resumed:
    the replica call still sees the cancel, and the handler's late calls on the ended context
    do nothing (peer() answers from the copy taken at the start)."""
    import asyncio
    import enum

    from segserve.proto.servicer import _mend_serve_handlers

    Kind = enum.Enum("Kind", "UNARY_STREAM")
    seen: dict[str, Any] = {}

    def serve_factory(*, service_method: str, streaming_type: Any) -> Any:
        async def unary_stream(request: Any, context: Any):
            try:
                for i in range(1000):
                    await asyncio.sleep(0.001)  # the replica's next item
                    yield f"item {i}"
            except asyncio.CancelledError:
                seen["replica_call_cancelled"] = True
            seen["peer_after_end"] = context.peer()
            seen["set_code_after_end"] = context.set_code("CANCELLED")

        return unary_stream

    factory = _mend_serve_handlers(serve_factory)
    assert _mend_serve_handlers(factory) is factory  # registering twice wraps once

    async def main() -> list[str]:
        context = _FakeContext()
        stream = factory(service_method="/m", streaming_type=Kind.UNARY_STREAM)("req", context)
        got = [await stream.__anext__() for _ in range(3)]
        context.end()  # the client went away while item 3 was being written
        await asyncio.sleep(0.05)
        # Checked here, while ``stream`` is still suspended: asyncio.run's teardown would
        # cancel a leftover generator itself.
        assert seen == {"replica_call_cancelled": True, "peer_after_end": "ipv4:10.0.0.1:5555",
                        "set_code_after_end": None}  # fmt: skip
        assert context.codes == []  # nothing reached the ended RPC
        del stream
        return got

    assert asyncio.run(main()) == ["item 0", "item 1", "item 2"]


def test_a_stream_that_ends_normally_passes_every_item_and_the_status():
    import asyncio
    import enum

    from segserve.proto.servicer import _mend_serve_handlers

    Kind = enum.Enum("Kind", "UNARY_STREAM")

    def serve_factory(*, service_method: str, streaming_type: Any) -> Any:
        async def unary_stream(request: Any, context: Any):
            for i in range(5):
                yield i
            context.set_code("OK")

        return unary_stream

    async def main() -> tuple[list[int], list[Any]]:
        context = _FakeContext()
        stream = _mend_serve_handlers(serve_factory)(service_method="/m",
                                                     streaming_type=Kind.UNARY_STREAM)
        items = [i async for i in stream("req", context)]
        return items, context.codes

    assert asyncio.run(main()) == ([0, 1, 2, 3, 4], ["OK"])


RAY_ACTOR_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: "
                  "ServeReplica:segserve:Ingress\n\tactor_id: 5a1f00d\n\tpid: 4242\n\tip: "
                  "10.0.0.7")  # fmt: skip


@pytest.mark.parametrize("metadata", [(("application", "segserve"),),
                                      (("application", "segserve"), ("request_id", "r-17"))])
def test_serve_s_own_errors_reach_the_client_without_internals(metadata):
    """Serve's proxy, when the ingress replica's call fails, sets INTERNAL with str() of Ray's
    exception (actor id, pid, node address). Through _mend_serve_handlers the client gets
    UNAVAILABLE naming the request id for a replica that died, and an opaque INTERNAL for
    anything else; the ingress's own statuses pass as they are."""
    import asyncio
    import enum

    from segserve.proto.servicer import _mend_serve_handlers

    Kind = enum.Enum("Kind", "UNARY_UNARY")
    StatusCode = grpc.StatusCode

    def serve_factory(*, service_method: str, streaming_type: Any) -> Any:
        async def unary_unary(request: Any, context: Any) -> bytes:
            ids = [v for k, v in context.invocation_metadata() if k == "request_id"]
            code, details = request
            context.set_code(code)
            context.set_details(details.replace("ID", ids[0]))  # Serve names its request id
            return b""

        return unary_unary

    def call(code: Any, details: str) -> _FakeContext:
        context = _FakeContext(metadata)
        handler = _mend_serve_handlers(serve_factory)(service_method="/m",
                                                      streaming_type=Kind.UNARY_UNARY)
        asyncio.run(handler((code, details), context))
        return context

    died = call(StatusCode.INTERNAL, RAY_ACTOR_DIED)
    assert died.codes[-1] == StatusCode.UNAVAILABLE
    assert "became unavailable; retry (request id " in died.details[-1]
    assert not any(s in died.details[-1] for s in ("actor", "4242", "10.0.0.7"))
    if len(metadata) == 2:  # the client's own request id is the one named
        assert "(request id r-17)" in died.details[-1]
    other = call(StatusCode.INTERNAL, "Traceback (most recent call last): ... KeyError: 'x'")
    assert other.codes[-1] == StatusCode.INTERNAL
    assert other.details[-1].startswith("internal error (request id ") and "Key" not in \
        other.details[-1]
    quoted = call(StatusCode.INTERNAL, "Traceback ...\nAPIError: internal error (request id ID)")
    assert "Traceback" not in quoted.details[-1]  # a traceback quoting ours is still Ray's
    ours = call(StatusCode.INTERNAL, "internal error (request id ID)")  # the ingress's own
    assert ours.codes == [StatusCode.INTERNAL] and "Traceback" not in ours.details[-1]
    bad = call(StatusCode.INVALID_ARGUMENT, "model 'actor' does not exist")
    assert bad.codes == [StatusCode.INVALID_ARGUMENT]
    assert bad.details == ["model 'actor' does not exist"]

"""The service under abuse, live (real Ray Serve on loopback, the demo model): a fuzzer over HTTP
(schemathesis on the OpenAPI schema the ingress serves) and gRPC (random, mutated and raw
messages to every RPC), 200 streaming clients against a queue of 32, and clients that go away
at every point of a request. One Ray/Serve instance for the module.

After each test the service must be idle: the replicas run and queue nothing, hold no KV block,
and the ingress has nothing in flight (``Ingress.in_flight``). A client that leaves must have
its engine request aborted (the replica counts it under status "abort"), not run to the end.
The fuzzing itself is bench/fuzz.py; this runs a bounded number of its cases.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from live_helpers import free_port, start_ray, wait_for

os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback test cluster (see test_serve.py)

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.launch import GRPC_SERVICER  # noqa: E402
from segserve.deploy.router import deployment_name  # noqa: E402
from segserve.proto import segserve_pb2_grpc  # noqa: E402
from segserve.proto.client import generate_request  # noqa: E402


def _load(name: str):
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load("fuzz")
MAX_QUEUE_LEN = fuzz.CONFIG["pools"][0]["max_queue_len"]  # 32
# "slow": the same tiny model with a long context, for requests that must still be generating
# when their client leaves (2000 tokens: seconds, on any CPU). Its own application, so that the
# fuzzer (which tries every model the schema names) never asks it for thousands of tokens.
SLOW_CONFIG = {
    "models": [{**fuzz.CONFIG["models"][0], "name": "slow", "max_model_len": 2048}],
    "pools": [{"name": "slow", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 1024,
               "max_num_seqs": 4, "max_queue_len": 4, "cpus_per_replica": 1}],
}  # fmt: skip
SLOW_POOL = SLOW_CONFIG["pools"][0]
LONG = 1900  # tokens a "slow" request asks for




@pytest.fixture(scope="module")
def svc():
    start_ray(num_cpus=8)
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(fuzz.CONFIG), name="segserve", route_prefix="/")
    serve.run(build_app(SLOW_CONFIG), name="slow", route_prefix="/slow")
    replicas = {m: serve.get_deployment_handle(deployment_name(m, p), app_name=app)
                for m, p, app in (("demo", "cpu", "segserve"), ("slow", "slow", "slow"))}
    ingresses = [serve.get_deployment_handle("Ingress", app_name=app)
                 for app in ("segserve", "slow")]  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield SimpleNamespace(
        http_port=http_port,
        base=f"http://127.0.0.1:{http_port}",
        grpc_target=f"127.0.0.1:{grpc_port}",
        stub=segserve_pb2_grpc.SegServeStub(channel),
        stats=lambda model="demo": replicas[model].stats.remote().result(),
        # the replica's requests by final status (its routing stats carry them)
        finished=lambda model, status: replicas[model].record_routing_stats.remote().result()
        .get(f"requests_{status}", 0.0),
        in_flight=lambda: {k: v for i in ingresses for k, v in i.in_flight.remote().result()
                           .items()},
    )
    channel.close()
    serve.shutdown()
    ray.shutdown()


MD = (("application", "segserve"),)
SLOW_MD = (("application", "slow"),)




def _assert_idle(svc) -> None:
    """Nothing running, queued or in flight, and no KV block held, on both replicas."""
    for model in ("demo", "slow"):
        settled = fuzz.wait_idle(lambda m=model: svc.stats(m), svc.in_flight)
        assert settled["idle"] and settled["blocks_used"] == 0, (model, settled)


# ----- the schema ----------------------------------------------------------------------------
def test_openapi_schema_documents_bodies_errors_and_streams(svc):
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=30)
    conn.request("GET", "/openapi.json")
    schema = json.loads(conn.getresponse().read())
    conn.close()
    op = schema["paths"]["/v1/completions"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    assert {"400", "401", "404", "429", "500", "503", "504"} <= set(op["responses"])
    assert "422" not in op["responses"]  # bad input is a 400 here, never FastAPI's 422
    assert "text/event-stream" in op["responses"]["200"]["content"]
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert request["properties"]["model"]["enum"] == ["demo"]  # this application's
    assert request["properties"]["n"]["anyOf"][1] == {"type": "null"}  # null = the default
    tokens = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]
    assert tokens["items"]["maximum"] == fuzz.VOCAB - 1
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# ----- fuzzing -------------------------------------------------------------------------------
# Per operation: ~220 requests in all. schemathesis's coverage phase (~1400 requests, minutes
# on 2 cores) runs in bench/fuzz.py, not here.
HTTP_EXAMPLES, HTTP_PHASES = 20, "fuzzing,stateful"


def test_http_fuzz_gets_no_5xx_and_the_service_stays_healthy(svc):
    expected = fuzz.probe_answer(svc.base)
    report = fuzz.run_http_fuzz(svc.base, max_examples=HTTP_EXAMPLES, seed=1,
                                phases=HTTP_PHASES)
    assert report["passed"], json.dumps(report, indent=1)[:6000]
    assert report["cases"] > 150, report["statuses"]
    assert {"200", "400", "404"} <= set(report["statuses"]), report["statuses"]  # it went deep
    health = fuzz.check_healthy(svc.base, expected, svc.stats, svc.in_flight)
    assert health["passed"], health


def test_grpc_fuzz_gets_no_internal_or_unknown_and_the_service_stays_healthy(svc):
    expected = fuzz.probe_answer(svc.base)
    report = asyncio.run(fuzz.run_grpc_fuzz(svc.grpc_target, "segserve", cases=400, seed=3))
    assert report["passed"], json.dumps(report, indent=1)[:6000]
    assert report["codes"].get("OK", 0) > 50 and report["codes"].get("INVALID_ARGUMENT", 0) > 50
    raw = {k: n for k, n in report["by_rpc"].items() if "/raw/" in k}
    assert sum(raw.values()) > 50, report["by_rpc"]  # bytes that are no message were sent
    health = fuzz.check_healthy(svc.base, expected, svc.stats, svc.in_flight)
    assert health["passed"], health


def test_grpc_bytes_that_do_not_parse_are_invalid_argument(svc):
    channel = grpc.insecure_channel(svc.grpc_target)
    send_raw = channel.unary_unary("/segserve.v1.SegServe/Generate")  # bytes as they are
    for raw in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):  # corrupt; a model name not UTF-8
        with pytest.raises(grpc.RpcError) as info:
            send_raw(raw, metadata=MD, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "GenerateRequest" in info.value.details()
        assert "DecodeError" not in info.value.details()  # no exception class, no internals
    channel.close()


def test_a_huge_bad_value_still_gets_its_invalid_argument(svc):
    """An error message quoting a 100 kB value would not fit a gRPC status (16 KiB of headers):
    the client would see RESOURCE_EXHAUSTED from its own transport. Messages are cut."""
    request = generate_request(model="demo", prompt="hi", max_tokens=2)
    request.device = "x" * 100_000
    with pytest.raises(grpc.RpcError) as info:
        svc.stub.Generate(request, metadata=MD, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()[:200]
    assert "device" in info.value.details() and len(info.value.details()) <= 1000


def test_tool_parameters_nested_too_deep_are_invalid_argument(svc):
    """JSON nested past Python's recursion limit raised RecursionError (found by the fuzzer):
    INTERNAL, with Serve's traceback as its details."""
    request = generate_request(model="demo", messages=[{"role": "user", "content": "hi"}],
                               max_tokens=2)  # fmt: skip
    request.tools.add(name="f", parameters="[" * 5000 + "]" * 5000)
    with pytest.raises(grpc.RpcError) as info:
        svc.stub.Generate(request, metadata=MD, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()[:300]
    assert "tools.0.parameters" in info.value.details() or "JSON" in info.value.details()


# ----- overload ------------------------------------------------------------------------------
CLIENTS = 200


async def _http_stream(session, i: int) -> str:
    body = {"model": "demo", "prompt": [1 + i % 50, 2, 3], "max_tokens": 8, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    async with session.post("/v1/completions", json=body) as resp:
        if resp.status == 429:
            err = (await resp.json())["error"]
            return "429" if err["type"] == "rate_limit_error" else f"bad 429 body {err}"
        if resp.status != 200:
            return f"HTTP {resp.status}: {await resp.text()}"
        events = [line[6:].strip() async for line in resp.content if line.startswith(b"data: ")]
    if events[-1] != b"[DONE]":
        return f"no [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {chunks}"
    usage = chunks[-1]["usage"]
    return "ok" if usage and usage["completion_tokens"] == 8 else f"short answer: {usage}"


async def _grpc_stream(stub, i: int) -> str:
    request = generate_request(model="demo", prompt_token_ids=[1 + i % 50, 2, 3], max_tokens=8,
                               ignore_eos=True)  # fmt: skip
    tokens, usage = 0, None
    try:
        async for part in stub.GenerateStream(request, metadata=MD, timeout=300):
            tokens += sum(len(c.token_ids) for c in part.choices)
            usage = part.usage if part.HasField("usage") else usage
    except grpc.aio.AioRpcError as e:
        return "429" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else f"{e.code()}"
    ok = tokens == 8 and usage is not None and usage.completion_tokens == 8
    return "ok" if ok else f"short answer: {tokens} tokens, usage {usage}"


async def _burst(svc, clients: int) -> list[str]:
    import aiohttp

    limits = aiohttp.TCPConnector(limit=0)  # every client its own connection, all at once
    async with (aiohttp.ClientSession(svc.base, connector=limits,
                                      timeout=aiohttp.ClientTimeout(total=300)) as session,
                grpc.aio.insecure_channel(svc.grpc_target) as channel):  # fmt: skip
        stub = segserve_pb2_grpc.SegServeStub(channel)
        calls = [_http_stream(session, i) if i % 2 else _grpc_stream(stub, i)
                 for i in range(clients)]  # fmt: skip
        return await asyncio.gather(*calls, return_exceptions=False)


def test_overload_200_streaming_clients_get_a_full_answer_or_429(svc):
    soak = _load("soak")
    asyncio.run(_burst(svc, 20))  # warm-up: first requests allocate what later ones reuse
    _assert_idle(svc)
    pids = {name: pid for name, pid in soak.serve_processes().items()
            if "Ingress" in name or "LLM:demo" in name or "Proxy" in name}  # fmt: skip
    rss_start = {name: soak._rss_mib(pid) for name, pid in pids.items()}

    peak = {"waiting": 0.0}
    done = threading.Event()

    def sample_queue() -> None:  # the engine's queue never holds more than its bound
        while not done.is_set():
            peak["waiting"] = max(peak["waiting"], svc.stats()["waiting_requests"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_queue)
    sampler.start()
    try:
        outcomes = asyncio.run(_burst(svc, CLIENTS))
    finally:
        done.set()
        sampler.join()
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert set(counts) <= {"ok", "429"}, counts
    assert counts.get("ok", 0) >= MAX_QUEUE_LEN and counts.get("429", 0) > 0, counts
    assert peak["waiting"] <= MAX_QUEUE_LEN, peak
    _assert_idle(svc)
    rss_end = {name: soak._rss_mib(pid) for name, pid in pids.items()}
    for name in pids:  # bounded: 200 requests' worth of state is not kept
        assert rss_end[name] < rss_start[name] * 1.25 + 64, (name, rss_start, rss_end)


# ----- clients that go away ------------------------------------------------------------------
def _slow_body(stream: bool, max_tokens: int = LONG) -> str:
    return json.dumps({"model": "slow", "prompt": [5, 6, 7], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": stream})  # fmt: skip


def _open_http(svc, stream: bool) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    conn.request("POST", "/slow/v1/completions", _slow_body(stream),
                 {"Content-Type": "application/json"})  # fmt: skip
    return conn


def _hang_up(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _generating(svc, n: int = 1):
    return wait_for(lambda: svc.stats("slow")["running_requests"] >= n
                     and svc.stats("slow")["blocks_used"] > 0)  # fmt: skip


def _assert_aborted(svc, before: dict[str, float], n: int = 1) -> None:
    """The clients' engine requests ended as "abort" (none ran to its end), and all is idle."""
    got = wait_for(lambda: svc.finished("slow", "abort") >= before["abort"] + n)
    assert got, (_finished(svc), before, svc.stats("slow"))
    assert svc.finished("slow", "length") == before["length"]
    _assert_idle(svc)


def _finished(svc) -> dict[str, float]:
    return {status: svc.finished("slow", status) for status in ("abort", "length")}


def test_http_client_gone_during_a_unary_call(svc):
    before = _finished(svc)
    conn = _open_http(svc, stream=False)
    assert _generating(svc), svc.stats("slow")
    _hang_up(conn)
    _assert_aborted(svc, before)


def test_http_client_gone_before_the_first_byte(svc):
    """Queued behind a full batch, the request has no token yet when its client leaves."""
    before = _finished(svc)
    blockers = [_open_http(svc, stream=True) for _ in range(SLOW_POOL["max_num_seqs"])]
    assert _generating(svc, SLOW_POOL["max_num_seqs"]), svc.stats("slow")
    victim = _open_http(svc, stream=True)
    assert wait_for(lambda: svc.stats("slow")["waiting_requests"] == 1), svc.stats("slow")
    _hang_up(victim)
    # The queued request leaves the queue while the batch still runs: it was aborted there.
    left = wait_for(lambda: (s := svc.stats("slow"))["waiting_requests"] == 0 and s)
    assert left and left["running_requests"] == SLOW_POOL["max_num_seqs"], left
    for conn in blockers:
        _hang_up(conn)
    _assert_aborted(svc, before, 1 + len(blockers))


def test_http_stream_opened_but_never_read(svc):
    """The response began (status and headers) and the client leaves without reading it."""
    before = _finished(svc)
    conn = _open_http(svc, stream=True)
    resp = conn.getresponse()
    assert resp.status == 200
    assert _generating(svc), svc.stats("slow")
    _hang_up(conn)
    _assert_aborted(svc, before)


def _slow_request(max_tokens: int = LONG):
    return generate_request(model="slow", prompt_token_ids=[5, 6, 7], max_tokens=max_tokens,
                            ignore_eos=True)  # fmt: skip


def _assert_stream_cancel_aborts(svc, open_and_cancel) -> None:
    """``open_and_cancel()`` opens a "slow" gRPC stream and cancels it: the engine request is
    aborted, every time. (Serve 2.60's gRPC proxy alone loses a cancel that lands while it writes
    an item, which is most of a stream's life; it ran such a request to its end in 3 of ~7 CI
    runs. proto/servicer.py's _cancellable_streams makes the proxy pass every cancel on.) Three
    streams, so that a lost cancel shows."""
    for _ in range(3):
        before = _finished(svc)
        open_and_cancel()
        _assert_aborted(svc, before)


def test_grpc_stream_cancelled_mid_stream(svc):
    def open_and_cancel() -> None:
        call = svc.stub.GenerateStream(_slow_request(), metadata=SLOW_MD, timeout=300)
        for _ in range(3):  # tokens arrive
            assert next(call).choices[0].token_ids
        call.cancel()

    _assert_stream_cancel_aborts(svc, open_and_cancel)


def test_grpc_stream_opened_but_never_iterated(svc):
    def open_and_cancel() -> None:
        call = svc.stub.GenerateStream(_slow_request(), metadata=SLOW_MD, timeout=300)
        assert _generating(svc), svc.stats("slow")
        call.cancel()

    _assert_stream_cancel_aborts(svc, open_and_cancel)


def test_grpc_unary_call_cancelled(svc):
    before = _finished(svc)
    future = svc.stub.Generate.future(_slow_request(), metadata=SLOW_MD, timeout=300)
    assert _generating(svc), svc.stats("slow")
    future.cancel()
    _assert_aborted(svc, before)


# The deadline leaves the request time to reach the engine on a loaded 2-core CI box (with
# 1 s it once expired in routing, so the engine never saw the request), and is still far
# shorter than the ~8 s the "slow" request needs to run to its end.
DEADLINE_S = 4.0


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_deadline_aborts_the_request(svc, method):
    """The client's deadline passes while the request generates: DEADLINE_EXCEEDED for the
    client, and the engine request is aborted rather than run to its end."""
    if method == "GenerateStream":
        # A stream's deadline reaches the replica as the proxy's cancel (see
        # _assert_stream_cancel_aborts).
        def open_and_expire() -> None:
            stream = svc.stub.GenerateStream(_slow_request(), metadata=SLOW_MD,
                                             timeout=DEADLINE_S)  # fmt: skip
            assert next(stream).choices[0].token_ids  # the engine has it before the deadline
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        _assert_stream_cancel_aborts(svc, open_and_expire)
        return
    before = _finished(svc)
    future = svc.stub.Generate.future(_slow_request(), metadata=SLOW_MD, timeout=DEADLINE_S)
    assert _generating(svc), svc.stats("slow")  # the engine has it before the deadline
    error = future.exception(timeout=60)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_aborted(svc, before)

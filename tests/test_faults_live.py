"""Faults under a real local Ray Serve: a pool of two demo-model replicas, and one of them is
killed or broken while requests run. Clients get a complete answer or a clean, opaque error,
a request that has streamed nothing is retried on the other replica, and the service answers
again (and Serve has replaced the replica) within 60 s. Last, streams survive a rolling update
and `segserve serve`'s SIGTERM path (drain_and_shutdown). Its own Ray instance.

Faults are injected inside a replica's process through ``__ray_call__``: the function runs
there on the LLMReplica object.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_helpers import start_ray
from live_helpers import wait_for as poll

os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback test cluster

import ray  # noqa: E402
from ray import cloudpickle, serve  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.launch import drain_and_shutdown  # noqa: E402
from segserve.deploy.router import deployment_name  # noqa: E402

APP = "faults"
DEPLOYMENT = deployment_name("demo", "cpu")
POOL = {"name": "cpu", "device": "cpu", "num_replicas": 2, "num_kv_blocks": 128,
        "max_num_seqs": 4, "max_queue_len": 8, "max_num_batched_tokens": 256,
        "cpus_per_replica": 1, "graceful_shutdown_timeout_s": 120}  # fmt: skip
CONFIG = {"models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
          "pools": [POOL]}  # fmt: skip
INTERNALS = ("Actor", "actor_id", "pid", "127.0.0.1", "Traceback", "ray.", "boom")
RECOVERY_S = 60  # the bound on recovery; a bound on waiting, not a speed test

# The functions below run inside replica processes, where this test module is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(num_cpus=8)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    serve.run(build_app(CONFIG), name=APP, route_prefix="/")
    yield port
    serve.shutdown()
    ray.shutdown()


# ----- helpers --------------------------------------------------------------------------------
def _replica_actors() -> dict[str, object]:
    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#")}  # fmt: skip


def _in_replica(actor, fn):
    return fn(actor._replica_impl._user_callable_wrapper._callable)  # Serve 2.60's layout


def _on(actor, fn, dead=None):
    """fn(the LLMReplica) in that replica's process (``dead`` if the replica is gone)."""
    try:
        return ray.get(actor.__ray_call__.remote(_in_replica, fn), timeout=30)
    except ray.exceptions.RayActorError:
        return dead


def _running_replicas() -> int:
    app = serve.status().applications.get(APP)
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0) if app else 0


def wait_for(pred, timeout: float = RECOVERY_S):
    return poll(pred, timeout, interval=0.2)


def _complete(port: int, max_tokens: int = 4) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": "demo", "prompt": "hello there", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def _stream(port: int, max_tokens: int, started: threading.Event | None = None) -> dict:
    """One SSE completion: its status, tokens, finish reason, error events and [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": "demo", "prompt": "a long story " * 4, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = {"status": resp.status, "tokens": 0, "finish": None, "errors": [], "done": False}
    if resp.status != 200:
        out["errors"].append(json.loads(resp.read())["error"])
        conn.close()
        return out
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            out["done"] = True
            break
        event = json.loads(data)
        if "error" in event:
            out["errors"].append(event["error"])
        elif event["choices"]:
            out["finish"] = event["choices"][0]["finish_reason"] or out["finish"]
        elif event.get("usage"):
            out["tokens"] = event["usage"]["completion_tokens"]
        if started is not None:
            started.set()
    conn.close()
    return out


def _assert_opaque(error: dict, status: int) -> None:
    assert error["code"] == status, error
    assert not any(s in error["message"] for s in INTERNALS), error
    assert "request id" in error["message"], error


def _recovered(port: int, names_before: set[str], gone: str) -> None:
    """The service answers, and Serve has replaced the replica within RECOVERY_S."""
    assert _complete(port)[0] == 200
    assert wait_for(lambda: gone not in _replica_actors() and _running_replicas() == 2
                     and len(_replica_actors()) == 2), (names_before, _replica_actors())
    assert _complete(port)[0] == 200


def _streaming(port: int, pool: ThreadPoolExecutor, actors: dict, max_tokens: int):
    """Start a stream; once it has begun: its future, and the name of the replica running it."""
    started = threading.Event()
    stream = pool.submit(_stream, port, max_tokens, started)
    assert started.wait(60), "the stream never started"
    busy = [n for n, a in actors.items() if _on(a, lambda r: len(r.engine._queues))]
    assert len(busy) == 1, busy
    return stream, busy[0]


# ----- the tests ------------------------------------------------------------------------------
def _hang_steps(replica):
    import threading as th

    never = th.Event()
    replica.engine.core.step = lambda: never.wait() and []  # the device hangs
    return True


def _look_busy(replica):
    stats = replica._stats
    replica._stats = lambda: {**stats(), "waiting_requests": 1e6}  # the router avoids it
    return True


def _look_normal(replica):
    del replica._stats
    return True


def test_killing_a_replica_ends_its_stream_cleanly_retries_the_unstreamed_and_recovers(port):
    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    with ThreadPoolExecutor(5) as pool:
        long, victim = _streaming(port, pool, actors, 400)
        (other,) = set(actors) - {victim}
        # The victim hangs mid-stream; new requests go to it and wait there, unstreamed.
        _on(actors[victim], _hang_steps)
        _on(actors[other], _look_busy)
        time.sleep(1.5)  # the routers' stats refresh every 0.5 s
        short = [pool.submit(_stream, port, 8) for _ in range(4)]
        assert wait_for(lambda: _on(actors[victim], lambda r: len(r.engine._queues)) >= 2, 30)
        ray.kill(actors[victim])
        out = long.result(timeout=120)
        results = [s.result(timeout=120) for s in short]
    _on(actors[other], _look_normal)
    # Mid-stream: a clean, opaque, retryable error event (no chunk claimed it finished).
    assert out["status"] == 200 and out["done"] and out["finish"] is None, out
    _assert_opaque(out["errors"][0], 503)
    # Nothing streamed yet: retried on the other replica, every one answered in full.
    for r in results:
        assert r == {"status": 200, "tokens": 8, "finish": "length", "errors": [],
                     "done": True}, r  # fmt: skip
    _recovered(port, set(actors), victim)


def test_a_dead_engine_loop_ends_its_stream_and_its_replica_is_skipped_and_replaced(port):
    assert wait_for(lambda: _running_replicas() == 2)
    with ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, port, 400, started)
        assert started.wait(60), "the stream never started"
        actors = _replica_actors()

        def kill_loop(replica):
            if not replica.engine._queues:
                return False
            task = replica.engine._task
            task.get_loop().call_soon_threadsafe(task.cancel)
            return True

        killed = [n for n, a in actors.items() if _on(a, kill_loop)]
        assert len(killed) == 1, killed
        out = stream.result(timeout=120)
    assert out["status"] == 200 and out["done"], out
    if out["errors"]:
        _assert_opaque(out["errors"][0], 500)
    else:
        assert out["tokens"] == 400, out
    for _ in range(4):  # its 503s go to the other replica, until Serve replaces it
        status, body = _complete(port)
        assert status == 200, body
    _recovered(port, set(actors), killed[0])


def _gate_steps(replica):
    import threading as th

    gate = replica.engine._test_gate = th.Event()
    gate.set()
    step = replica.engine.core.step
    replica.engine.core.step = lambda: (gate.wait(), step())[1]
    return True


def _close_gates(actors: dict) -> None:
    """Pause every replica's steps: its streams wait mid-way."""
    for a in actors.values():
        _on(a, lambda r: r.engine._test_gate.clear())


def _open_gates(actors: dict) -> None:
    for a in actors.values():
        _on(a, lambda r: r.engine._test_gate.set())


def _draining(actor) -> bool:
    """Serve has told the replica to stop: it takes nothing new and waits for its requests."""
    try:
        return ray.get(actor.__ray_call__.remote(lambda a: a._replica_impl._shutting_down),
                       timeout=30)  # fmt: skip
    except ray.exceptions.RayActorError:
        return False


def _stream_paused_mid_way(port: int, pool: ThreadPoolExecutor, actors: dict, max_tokens: int):
    for a in actors.values():
        _on(a, _gate_steps)
    stream, name = _streaming(port, pool, actors, max_tokens)
    _close_gates(actors)
    return stream, name


def _ingress_name() -> str | None:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#Ingress#")]  # fmt: skip
    return names[0] if len(names) == 1 else None


def test_killing_the_ingress_mid_stream_aborts_its_engine_request_and_recovers(port):
    """The ingress (not the engine's replica) dies mid-stream: its client's stream is cut
    (Serve's proxy ends it unfinished: no [DONE]), the replica call it owned is cancelled, so the
    engine aborts the request and frees its blocks instead of generating to the end, and Serve
    replaces the ingress within 60 s."""
    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    aborts = lambda: sum(_on(a, lambda r: r.metrics.request_counts["abort"], 0)  # noqa: E731
                         for a in actors.values())  # fmt: skip
    before = aborts()
    name = _ingress_name()
    with ThreadPoolExecutor(1) as pool:
        # Paused mid-way: the request cannot finish by itself while the kill propagates.
        stream, replica = _stream_paused_mid_way(port, pool, actors, 400)
        ray.kill(ray.get_actor(name, namespace="serve"))
        out = stream.result(timeout=120)
        assert wait_for(lambda: aborts() == before + 1), "the engine request was not aborted"
        _open_gates(actors)
    assert not out["done"] and out["finish"] is None, out
    assert wait_for(lambda: _on(actors[replica], lambda r: r.engine.stats()["blocks_used"]) == 0)
    assert wait_for(lambda: _ingress_name() not in (None, name) and _complete(port)[0] == 200)


def test_killing_the_ingress_during_a_unary_call_gives_a_clean_503(port):
    """The ingress dies while a unary request waits on the engine, before any response: Serve's
    proxy alone sends nothing and uvicorn answers a bare 500. deploy/proxy_middleware.py, installed
    in the proxy, answers the OpenAI-style 503 instead (retryable), naming the request id and
    nothing of Ray's exception. The engine request is aborted."""
    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    for a in actors.values():
        _on(a, _gate_steps)
    _close_gates(actors)  # the request waits in the engine until the ingress is gone
    name = _ingress_name()
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(_complete, port, 50)
            assert wait_for(lambda: any(_on(a, lambda r: len(r.engine._queues))
                                        for a in actors.values())), "the request never arrived"
            ray.kill(ray.get_actor(name, namespace="serve"))
            status, body = call.result(timeout=120)
    finally:
        _open_gates(actors)
    assert status == 503, (status, body)
    _assert_opaque(body["error"], 503)
    assert body["error"]["type"] == "service_unavailable", body
    assert wait_for(lambda: _ingress_name() not in (None, name) and _complete(port)[0] == 200)


def test_a_stopped_ingress_does_not_stall_the_engine_replica_serving_it(port):
    """The ingress process stops (SIGSTOP: a paused VM, a long GC) with a stream in flight.
    The engine replica serving that stream must go on answering its health checks: a stalled
    one is killed by Serve as well, with every other request on it. (A Ray actor-call stream
    blocks the callee's event loop until its caller takes the items; the ingress's calls to
    the engine go over gRPC instead, where a slow reader only holds back its own stream.)
    Resumed within the ingress's own health-check window, the stream then finishes."""
    import signal

    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    ingress = ray.get_actor(_ingress_name(), namespace="serve")
    pid = ray.get(ingress.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    health = []
    with ThreadPoolExecutor(1) as pool:
        stream, replica = _streaming(port, pool, actors, 400)
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                time.sleep(1.5)
                try:
                    ray.get(actors[replica].check_health.remote(), timeout=3)
                    health.append("ok")
                except ray.exceptions.GetTimeoutError:
                    health.append("stalled")
        finally:
            os.kill(pid, signal.SIGCONT)
        out = stream.result(timeout=120)
    assert health == ["ok"] * 3, health
    assert out["done"] and out["finish"] == "length" and out["tokens"] == 400, out


def test_a_hung_replica_process_fails_its_stream_and_is_replaced_within_60_s(port):
    """The replica's whole process stops (SIGSTOP: a stuck driver, a paused VM). It answers
    nothing, health checks included: Serve must kill it (not wait its 120 s grace period on
    it), its stream must end with a clean error, and the service answer within 60 s."""
    import signal

    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    with ThreadPoolExecutor(1) as pool:
        stream, victim = _streaming(port, pool, actors, 400)
        pid = _on(actors[victim], lambda r: os.getpid())
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            out = stream.result(timeout=120)
            ended_after = time.monotonic() - stopped_at
            assert wait_for(lambda: victim not in _replica_actors()), "the hung replica stayed"
        finally:
            try:  # never leave a stopped process behind
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert out["status"] == 200 and out["done"] and out["finish"] is None, out
    _assert_opaque(out["errors"][0], 503)
    assert ended_after < RECOVERY_S, ended_after
    _recovered(port, set(actors), victim)


def test_replacing_replicas_drains_the_streams_under_way(port):
    """A redeploy (serve.run: a rolling update, here also down to one replica) stops the old
    replicas gracefully: the stream paused on one finishes after its replica began to stop."""
    assert wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    one = build_app({**CONFIG, "pools": [{**POOL, "num_replicas": 1}]})
    with ThreadPoolExecutor(2) as pool:
        stream, name = _stream_paused_mid_way(port, pool, actors, 100)
        update = pool.submit(serve.run, one, name=APP, route_prefix="/")  # waits till running
        assert wait_for(lambda: _draining(actors[name]), 120), "the replica never stopped"
        assert not stream.done()
        _open_gates(actors)
        out = stream.result(timeout=120)
        update.result(timeout=300)
    assert out == {"status": 200, "tokens": 100, "finish": "length", "errors": [],
                   "done": True}, out  # fmt: skip
    assert wait_for(lambda: not set(_replica_actors()) & set(actors), 120)
    assert _complete(port)[0] == 200


def test_shutdown_drains_the_streams_under_way(port):
    """`segserve serve` on SIGTERM: deleting the apps drains them, then Serve stops. Last: it
    shuts this module's Serve down."""
    assert wait_for(lambda: _running_replicas() >= 1)
    actors = _replica_actors()
    with ThreadPoolExecutor(2) as pool:
        stream, name = _stream_paused_mid_way(port, pool, actors, 100)
        shutdown = pool.submit(drain_and_shutdown, 120)
        assert wait_for(lambda: _draining(actors[name]), 60), ("the replica never stopped",
                                                               stream.done() and stream.result())
        assert not stream.done()
        _open_gates(actors)
        out = stream.result(timeout=120)
        shutdown.result(timeout=180)
    assert out == {"status": 200, "tokens": 100, "finish": "length", "errors": [],
                   "done": True}, out  # fmt: skip

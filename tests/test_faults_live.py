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
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
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


def _wait_for(pred, timeout: float = RECOVERY_S):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


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
    assert _wait_for(lambda: gone not in _replica_actors() and _running_replicas() == 2
                     and len(_replica_actors()) == 2), (names_before, _replica_actors())
    assert _complete(port)[0] == 200


# ----- the tests ------------------------------------------------------------------------------
def test_a_replica_killed_mid_stream_ends_its_stream_cleanly_and_is_replaced(port):
    assert _wait_for(lambda: _running_replicas() == 2)
    with ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, port, 400, started)
        assert started.wait(60), "the stream never started"
        actors = _replica_actors()
        busy = [n for n, a in actors.items() if _on(a, lambda r: len(r.engine._queues))]
        assert len(busy) == 1, busy
        ray.kill(actors[busy[0]])
        out = stream.result(timeout=120)
    assert out["status"] == 200 and out["done"], out
    if out["errors"]:  # or it finished before the kill landed: a complete answer
        _assert_opaque(out["errors"][0], 503)
        assert out["finish"] is None  # no chunk claimed it finished
    else:
        assert out["tokens"] == 400 and out["finish"] == "length", out
    _recovered(port, set(actors), busy[0])


def test_a_request_not_yet_streamed_is_retried_on_the_other_replica(port):
    assert _wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    stuck_name = sorted(actors)[0]

    def hang_steps(replica):
        import threading as th

        never = th.Event()
        replica.engine.core.step = lambda: never.wait() and []  # the device hangs
        return True

    _on(actors[stuck_name], hang_steps)
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, port, 8) for _ in range(6)]
        # Some land on the hung replica: they wait there, with nothing streamed.
        assert _wait_for(lambda: _on(actors[stuck_name], lambda r: len(r.engine._queues)), 30)
        ray.kill(actors[stuck_name])
        results = [s.result(timeout=120) for s in streams]
    for out in results:  # every one was answered in full, the stuck ones by the other replica
        assert out["status"] == 200 and not out["errors"], out
        assert out["tokens"] == 8 and out["finish"] == "length" and out["done"], out
    _recovered(port, set(actors), stuck_name)


def test_a_broken_engine_fails_health_is_skipped_and_replaced(port):
    assert _wait_for(lambda: _running_replicas() == 2)
    actors = _replica_actors()
    sick_name = sorted(actors)[0]

    def break_device(replica):
        def broken(*args, **kwargs):
            raise RuntimeError("boom: CUDA error: an illegal memory access")

        replica.engine._device_op = broken  # the idle probe fails
        replica.engine.core.step = broken  # and so would every step
        return True

    _on(actors[sick_name], break_device)
    # The next health check (every 2 s) finds it; then the router skips it, and a request it
    # still gets is refused with a 503 that the ingress retries on the other replica.
    assert _wait_for(lambda: _on(actors[sick_name], lambda r: r.engine.broken, "gone"), 30)
    for _ in range(6):
        status, body = _complete(port, 6)
        assert status == 200 and body["usage"]["completion_tokens"] == 6, body
    _recovered(port, set(actors), sick_name)


def test_a_dead_engine_loop_ends_its_stream_cleanly_and_the_service_goes_on(port):
    assert _wait_for(lambda: _running_replicas() == 2)
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


def _slow_steps(replica):
    import time as t

    step = replica.engine.core.step
    replica.engine.core.step = lambda: (t.sleep(0.03), step())[1]
    return True


def test_a_rolling_update_drains_the_streams_under_way(port):
    assert _wait_for(lambda: _running_replicas() == 2)
    old = _replica_actors()
    for a in old.values():  # streams outlast the new replicas' start
        _on(a, _slow_steps)
    with ThreadPoolExecutor(2) as pool:
        started = [threading.Event(), threading.Event()]
        streams = [pool.submit(_stream, port, 300, e) for e in started]
        assert all(e.wait(60) for e in started)
        changed = {**CONFIG, "pools": [{**POOL, "num_kv_blocks": 96}]}  # new engines
        serve.run(build_app(changed), name=APP, route_prefix="/", blocking=False)
        assert _wait_for(lambda: not set(_replica_actors()) & set(old), 120)  # replaced
        results = [s.result(timeout=300) for s in streams]
    for out in results:  # drained: every token, then [DONE]
        assert out == {"status": 200, "tokens": 300, "finish": "length", "errors": [],
                       "done": True}, out  # fmt: skip
    assert _complete(port)[0] == 200


def test_shutdown_drains_the_streams_under_way(port):
    """`segserve serve` on SIGTERM: deleting the apps drains them, then Serve stops. Last: it
    shuts this module's Serve down."""
    assert _wait_for(lambda: _running_replicas() == 2)
    for a in _replica_actors().values():
        _on(a, _slow_steps)
    with ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        stream = pool.submit(_stream, port, 200, started)
        assert started.wait(60)
        drain_and_shutdown(timeout_s=120)
        out = stream.result(timeout=60)
    assert out == {"status": 200, "tokens": 200, "finish": "length", "errors": [],
                   "done": True}, out  # fmt: skip

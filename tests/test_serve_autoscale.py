"""Live autoscaling: KV/queue pressure scales a pool from 1 to 2 replicas, and idleness brings
it back. Its own Ray instance, because replicas must push autoscaling metrics every 0.5 s
(Serve's default is 10 s) and that setting is read when Ray's workers start."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading

import pytest
from live_helpers import start_ray
from live_helpers import wait_for as poll

os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback test cluster
os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.router import deployment_name  # noqa: E402

CONFIG = {
    "models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
    "pools": [{
        "name": "cpu", "device": "cpu", "num_kv_blocks": 256, "max_num_seqs": 2,
        "max_queue_len": 64, "max_num_batched_tokens": 256,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0,
                        "downscale_delay_s": 1, "look_back_period_s": 11,
                        "scale_up_waiting_per_replica": 1},
    }],
}  # fmt: skip
DEPLOYMENT = deployment_name("demo", "cpu")


def _running_replicas() -> int:
    app = serve.status().applications["segserve"]
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def wait_for(pred, timeout: float) -> bool:
    """A bound on how long the cluster may take to react, not a speed assertion."""
    return bool(poll(pred, timeout, interval=0.25))


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(num_cpus=8)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    serve.run(build_app(CONFIG), name="segserve", route_prefix="/")
    yield port
    serve.shutdown()
    ray.shutdown()


def test_waiting_requests_scale_up_then_idle_scales_down(port):
    assert _running_replicas() == 1
    stop = threading.Event()
    statuses: list[int] = []

    def keep_busy():
        body = json.dumps({"model": "demo", "prompt": "busy", "max_tokens": 64,
                           "ignore_eos": True})  # fmt: skip
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            conn.close()

    # 8 clients against max_num_seqs=2: ~6 requests wait at all times.
    clients = [threading.Thread(target=keep_busy) for _ in range(8)]
    for c in clients:
        c.start()
    try:
        scaled_up = wait_for(lambda: _running_replicas() == 2, timeout=120)
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert scaled_up, "waiting requests never scaled the pool to 2 replicas"
    assert statuses and set(statuses) == {200}, set(statuses)

    # Idle now: KV drains, nothing waits, so the policy steps back to min_replicas.
    assert wait_for(lambda: _running_replicas() == 1, timeout=120), "never scaled back down"

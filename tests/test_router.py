"""Pool choice and spill (PoolRouter/PoolState) and replica ranking (KVHeadroomRouter).

Replica stats reach PoolState through the request routers registered in ``routing_view.ROUTERS``;
here fake routers (anything with ``replica_stats()``) or a real KVHeadroomRouter with fake
replicas stand in for Serve.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from segserve.deploy import routing_view
from segserve.deploy.app import replica_options
from segserve.deploy.config import parse_service_config
from segserve.deploy.errors import APIError
from segserve.deploy.router import (
    KVHeadroomRouter,
    PoolRouter,
    PoolState,
    deployment_name,
    replica_load,
)

APP = "segserve"


@pytest.fixture(autouse=True)
def clean_routers():
    saved = dict(routing_view.ROUTERS)
    routing_view.ROUTERS.clear()
    yield routing_view.ROUTERS
    routing_view.ROUTERS.clear()
    routing_view.ROUTERS.update(saved)


# The CPU pool is listed first: accelerator pools still come first for "auto".
CONFIG = parse_service_config(
    {
        "models": [{"name": "m"}, {"name": "c", "pools": ["cpu"]}],
        "pools": [
            {"name": "cpu", "device": "cpu", "max_num_seqs": 2},
            {"name": "gpu", "device": "cuda", "max_num_seqs": 4,
             "spill_waiting_requests": 2, "spill_kv_utilization": 0.9},
        ],
    }
)  # fmt: skip


class FakeRouter:
    def __init__(self, stats: list[dict[str, float]]) -> None:
        self.stats = stats

    def replica_stats(self) -> list[dict[str, float]]:
        return self.stats


def stats(waiting: float = 0.0, util: float = 0.0, running: float = 0.0) -> dict[str, float]:
    return {"waiting_requests": waiting, "utilization": util, "running_requests": running}


def register(pool: str, *replicas: dict[str, float], model: str = "m", app: str = APP):
    routing_view.ROUTERS[(app, deployment_name(model, pool))] = FakeRouter(list(replicas))


@pytest.fixture
def pr() -> PoolRouter:
    return PoolRouter(CONFIG, APP)


def choose(pr: PoolRouter, device: str = "auto", model: str = "m") -> str:
    return pr.choose(CONFIG.model(model), device).pool.name


def state(pr: PoolRouter, pool: str, model: str = "m") -> PoolState:
    return next(s for s in pr.pools[model] if s.pool.name == pool)


def test_deployment_names_and_order(pr):
    assert [(s.pool.name, s.deployment) for s in pr.pools["m"]] == [
        ("gpu", "LLM:m:gpu"),
        ("cpu", "LLM:m:cpu"),
    ]
    assert [s.deployment for s in pr.pools["c"]] == ["LLM:c:cpu"]
    assert len(list(pr.all_states())) == 3


def test_no_stats_prefers_the_accelerator(pr):
    assert choose(pr, "auto") == "gpu"
    assert choose(pr, "gpu") == "gpu"
    assert choose(pr, "cpu") == "cpu"


def test_device_not_served(pr):
    with pytest.raises(APIError) as info:
        pr.choose(CONFIG.model("c"), "gpu")
    assert info.value.status == 404
    assert info.value.param == "device"
    assert "'c'" in info.value.message and "gpu" in info.value.message
    assert choose(pr, "auto", model="c") == "cpu"
    assert choose(pr, "cpu", model="c") == "cpu"


def test_spill_when_every_gpu_replica_waits(pr):
    register("gpu", stats(waiting=2), stats(waiting=3))
    assert choose(pr, "auto") == "cpu"
    # a pinned device never spills
    assert choose(pr, "gpu") == "gpu"


def test_spill_on_waiting_or_kv(pr):
    register("gpu", stats(waiting=2, util=0.1), stats(waiting=0, util=0.9))
    assert choose(pr, "auto") == "cpu"


def test_one_gpu_replica_with_headroom_keeps_gpu(pr):
    # waiting 1 < 2 and utilization 0.89 < 0.9: this replica still has room
    register("gpu", stats(waiting=5, util=0.99), stats(waiting=1, util=0.89))
    assert choose(pr, "auto") == "gpu"


def test_stats_of_another_app_are_not_read(pr):
    register("gpu", stats(waiting=9), app="other")
    assert choose(pr, "auto") == "gpu"


def test_both_saturated_pick_the_lower_load(pr):
    # gpu load (0 in flight + 4 + 4 waiting) / 2 replicas = 4; cpu load 3 / 1 = 3
    register("gpu", stats(waiting=4), stats(waiting=4))
    register("cpu", stats(waiting=3))
    assert state(pr, "gpu").load(APP) == 4.0
    assert state(pr, "cpu").load(APP) == 3.0
    assert choose(pr, "auto") == "cpu"
    # cpu load 5 > 4: back to the gpu pool
    register("cpu", stats(waiting=5))
    assert choose(pr, "auto") == "gpu"


def test_load_counts_in_flight(pr):
    register("gpu", stats(waiting=1), stats(waiting=1))
    gpu = state(pr, "gpu")
    gpu.in_flight = 6
    assert gpu.load(APP) == (6 + 2) / 2
    cpu = state(pr, "cpu")
    cpu.in_flight = 3
    assert cpu.load(APP) == 3.0  # no stats: one replica assumed


def test_in_flight_saturates_without_stats(pr):
    gpu = state(pr, "gpu")
    gpu.in_flight = 3  # max_num_seqs 4 x 1 (assumed) replica
    assert not gpu.saturated(APP)
    assert choose(pr, "auto") == "gpu"
    gpu.in_flight = 4
    assert gpu.saturated(APP)
    assert choose(pr, "auto") == "cpu"


def test_in_flight_saturates_with_replicas(pr):
    register("gpu", stats(), stats())  # two idle replicas: capacity 4 x 2 = 8
    gpu = state(pr, "gpu")
    gpu.in_flight = 7
    assert choose(pr, "auto") == "gpu"
    gpu.in_flight = 8
    assert choose(pr, "auto") == "cpu"


def test_saturated_thresholds_are_per_pool(pr):
    # the cpu pool keeps the defaults: waiting >= 1 or utilization >= 0.95
    register("cpu", stats(waiting=1), model="c")
    assert state(pr, "cpu", "c").saturated(APP)
    register("cpu", stats(util=0.95), model="c")
    assert state(pr, "cpu", "c").saturated(APP)
    register("cpu", stats(util=0.94), model="c")
    assert not state(pr, "cpu", "c").saturated(APP)
    # missing keys read as 0
    register("cpu", {}, model="c")
    assert not state(pr, "cpu", "c").saturated(APP)


# ----- KVHeadroomRouter ------------------------------------------------------------------------
DEP = DeploymentID(name="LLM:m:gpu", app_name=APP)


def make_router() -> KVHeadroomRouter:
    return KVHeadroomRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)


def replica(name: str, routing_stats: dict[str, float] | None) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(name, DEP), routing_stats=routing_stats)


def test_replica_load_key():
    assert replica_load(stats(1, 0.5, 3), None) == (1.0, 0.5, 3.0)
    assert replica_load(stats(1, 0.5, 3), 7) == (1.0, 0.5, 7.0)  # fresh ongoing count wins
    assert replica_load({}, None) == (0.0, 0.0, 0.0)
    keys = [replica_load(stats(0, 0.9, 0), None), replica_load(stats(1, 0.0, 0), None),
            replica_load(stats(0, 0.1, 9), None)]  # fmt: skip
    assert sorted(keys) == [(0, 0.1, 9), (0, 0.9, 0), (1, 0.0, 0)]


async def test_choose_replicas_ranks_one_per_rank():
    r = make_router()
    a = replica("a", stats(waiting=0, util=0.9, running=5))
    b = replica("b", stats(waiting=1, util=0.1, running=0))
    c = replica("c", stats(waiting=0, util=0.5, running=7))
    d = replica("d", stats(waiting=0, util=0.5, running=1))
    e = replica("e", None)  # no stats reported yet
    r.replica_queue_len_cache.update(d.replica_id, 9)  # d: ongoing 9 beats c's running 7
    r.replica_queue_len_cache.update(e.replica_id, 2)
    ranks = await r.choose_replicas([a, b, c, d, e])
    assert [[x.replica_id.unique_id for x in rank] for rank in ranks] == [
        ["e"], ["c"], ["d"], ["a"], ["b"]
    ]  # fmt: skip


async def test_choose_replicas_skips_broken_replicas():
    r = make_router()
    good = replica("good", stats(util=0.9, running=5))
    sick = replica("sick", {**stats(), "healthy": 0.0})  # empty KV: it would look best
    marked = replica("marked", stats())
    r._replicas = {x.replica_id: x for x in (good, sick, marked)}
    assert [x.unique_id for rank in await r.choose_replicas([good, sick, marked])
            for x in (y.replica_id for y in rank)] == ["marked", "good"]  # fmt: skip
    r.mark_unavailable("marked")  # its 503 said so before its stats could
    assert await r.choose_replicas([good, sick, marked]) == [[good]]
    # None usable: they are all still offered, and their 503s tell clients to retry.
    assert sorted(x.replica_id.unique_id for rank in await r.choose_replicas([sick, marked])
                  for x in rank) == ["marked", "sick"]  # fmt: skip
    del r._replicas[marked.replica_id]  # replaced: forgotten at the next mark
    r.mark_unavailable("sick")
    assert r.unavailable == {"sick"}


async def test_choose_replicas_empty():
    assert await make_router().choose_replicas([]) == []


def test_router_registers_and_reports_stats(pr):
    r = make_router()
    r.initialize_state()
    assert routing_view.ROUTERS[(APP, "LLM:m:gpu")] is r
    full = [replica("a", stats(waiting=2)), replica("b", stats(util=0.95))]
    r._replicas = {x.replica_id: x for x in full}  # what update_replicas sets
    assert r.replica_stats() == [stats(waiting=2), stats(util=0.95)]
    assert choose(pr, "auto") == "cpu"  # PoolRouter reads the real router's stats
    r._replicas[ReplicaID("c", DEP)] = replica("c", None)
    assert r.replica_stats()[-1] == {}
    assert choose(pr, "auto") == "gpu"  # c has reported nothing: it counts as free


@pytest.fixture
def restore_router_class():
    """cloudpickle.loads of a class pickled in this process re-installs its methods on the
    original class; put the originals back so later tests see the module's own code."""
    saved = {k: v for k, v in vars(KVHeadroomRouter).items() if callable(v)}
    yield
    for k, v in saved.items():
        setattr(KVHeadroomRouter, k, v)


def test_router_as_serve_ships_it_registers_in_the_module(restore_router_class):
    from ray import cloudpickle

    cfg = parse_service_config(
        {"models": [{"name": "m"}], "pools": [{"name": "gpu", "device": "cuda"}]}
    )
    rc = replica_options(cfg.pools[0])["request_router_config"]
    cls = cloudpickle.loads(rc.get_serialized_request_router_cls())  # what the handle does
    r = cls(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state()
    assert routing_view.ROUTERS.get((APP, "LLM:m:gpu")) is r


def test_replica_stats_while_its_first_step_runs():
    """AsyncEngine.stats() is empty while the engine's first step runs (no snapshot yet, and
    live state may not be read then): the replica keeps reporting its last complete stats
    instead of raising KeyError 'utilization' (what Serve logged at replica startup)."""
    from segserve.deploy.replica import ROUTING_KEYS, LLMReplica

    r = LLMReplica({"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 64},
                   "demo", "cpu")
    r.engine._stepping = True  # as while the worker thread steps, before any snapshot
    assert r.engine.stats() == {}
    idle = {"utilization": 0.0, "waiting_requests": 0.0, "running_requests": 0.0}
    assert {k: r.record_routing_stats()[k] for k in ROUTING_KEYS} == idle
    assert r.record_autoscaling_stats() == {"kv_utilization": 0.0, "waiting_requests": 0.0,
                                            "running_requests": 0.0}
    r.engine._stepping = False
    r.engine.core.add_request([0, 5, 6], None)  # waiting: stats are live again
    assert r.record_routing_stats()["waiting_requests"] == 1.0
    assert set(ROUTING_KEYS) <= set(r.engine.core.stats())


def test_metrics_text_from_replica_snapshots():
    """What /metrics renders from the replicas' routing stats, read back with Prometheus'
    own text parser."""
    from collections import Counter

    from prometheus_client.parser import text_string_to_metric_families
    from segserve.deploy.metrics import LatencyHistogram, ReplicaView, metrics_snapshot, render

    ttft, tpot = LatencyHistogram("ttft"), LatencyHistogram("tpot")
    for v in (0.003, 0.02, 0.02, 7.0, 60.0):
        ttft.observe(v)
    tpot.observe(0.004)
    kv = {"blocks_total": 256, "blocks_used": 10, "utilization": 10 / 256,
          "waiting_requests": 2, "running_requests": 3, "preemptions": 4}
    snap = metrics_snapshot(kv, (ttft, tpot), Counter({"stop": 5, "length": 1}))
    views = [ReplicaView("demo", "cpu", "r1", snap), ReplicaView("demo", "cpu", "r2", {})]
    samples = {}
    for family in text_string_to_metric_families(render(views).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    r1 = (("model", "demo"), ("pool", "cpu"), ("replica", "r1"))
    assert samples[("segserve_kv_blocks_total", r1)] == 256
    assert samples[("segserve_kv_utilization", r1)] == pytest.approx(10 / 256)
    assert samples[("segserve_kv_preemptions_total", r1)] == 4
    assert samples[("segserve_requests_total", (*r1[:2], ("replica", "r1"),
                                                ("status", "stop")))] == 5
    bucket = "segserve_time_to_first_token_seconds_bucket"
    assert samples[(bucket, tuple(sorted((*r1, ("le", "0.005")))))] == 1
    assert samples[(bucket, tuple(sorted((*r1, ("le", "0.025")))))] == 3
    assert samples[(bucket, tuple(sorted((*r1, ("le", "10.0")))))] == 4
    assert samples[(bucket, tuple(sorted((*r1, ("le", "+Inf")))))] == 5
    assert samples[("segserve_time_to_first_token_seconds_sum", r1)] == pytest.approx(67.043)
    assert samples[("segserve_time_per_output_token_seconds_count", r1)] == 1
    vllm = (("model_name", "demo"), ("pool", "cpu"), ("replica", "r1"))
    assert samples[("vllm:num_requests_waiting", vllm)] == 2
    assert samples[("vllm:kv_cache_usage_perc", vllm)] == pytest.approx(10 / 256)
    assert samples[("vllm:time_to_first_token_seconds_count", vllm)] == 5
    # a replica that has reported nothing yet has no series
    assert not any(dict(labels).get("replica") == "r2" for _, labels in samples)


def test_pool_router_replica_views():
    cfg = parse_service_config({"models": [{"name": "m"}],
                                "pools": [{"name": "cpu", "device": "cpu"}]})
    pr = PoolRouter(cfg, APP)
    assert pr.replica_views() == []
    r = KVHeadroomRouter(deployment_id=DeploymentID("LLM:m:cpu", APP),
                         handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state()
    rid = ReplicaID("x", DeploymentID("LLM:m:cpu", APP))
    r._replicas = {rid: replica("x", stats(util=0.5))}
    (view,) = pr.replica_views()
    assert (view.model, view.pool, view.replica, view.stats) == ("m", "cpu", "x",
                                                                 stats(util=0.5))

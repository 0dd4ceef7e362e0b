"""build_app: a ServiceConfig becomes a Serve application.

One LLMReplica deployment per (model, pool) pair, each with its resources, replica count or
KV-pressure autoscaling, and the KV-headroom request router; one Ingress in front that holds
a handle to each. With ``ingress.engine_in_ingress`` (one model on one pool) the Ingress is the
only deployment: it hosts the engine and takes the pool's options. Serve config files point
here: ``import_path: segserve.deploy.app:build_app``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .config import PoolConfig, ServiceConfig, engine_config
from .ingress import Ingress
from .replica import LLMReplicaDeployment
from .router import ROUTING_STATS_PERIOD_S, deployment_name

AUTOSCALING_POLICY = "segserve.deploy.autoscaling:KVPressurePolicy"
REQUEST_ROUTER = "segserve.deploy.router:KVHeadroomRouter"
HEALTH_CHECK_PERIOD_S = 2.0
# A replica that does not answer its check in this long (a hung process: SIGSTOP, a stuck
# driver) fails it; Serve's default, 30 s, times its three failures to 90 s before the
# replacement starts. Our checks read the engine's state and never wait on a step (an idle
# engine's device probe has its own bound, AsyncEngine.PROBE_TIMEOUT_S, also 10 s).
HEALTH_CHECK_TIMEOUT_S = 10.0
HEALTH_CHECKS = {"health_check_period_s": HEALTH_CHECK_PERIOD_S,
                 "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S}


def replica_options(pool: PoolConfig) -> dict[str, Any]:
    """Serve options of a pool's LLMReplica deployment."""
    actor: dict[str, Any] = {"num_cpus": pool.cpus_per_replica}
    if pool.is_accelerator:
        actor["num_gpus"] = 1
    opts: dict[str, Any] = {"ray_actor_options": actor}
    if pool.tensor_parallel_size > 1:
        # One replica is one replica group: a placement group with a bundle per rank. The
        # replica (rank 0) takes bundle 0; its TPWorker actors take the others.
        bundle = {"CPU": pool.cpus_per_replica, **({"GPU": 1} if pool.is_accelerator else {})}
        opts["placement_group_bundles"] = [bundle] * pool.tensor_parallel_size
        opts["placement_group_strategy"] = pool.placement_strategy
    opts.update({
        # The engine batches and queues itself: let Serve hand it everything up to its
        # bounded queue, which answers 429 past that (max_queued_requests bounds the rest).
        "max_ongoing_requests": pool.max_num_seqs + pool.max_queue_len,
        "max_queued_requests": pool.max_queue_len,
        "request_router_config": RequestRouterConfig(
            request_router_class=REQUEST_ROUTER,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
        # A replica being stopped drains: Serve sends it nothing new and waits for its
        # running requests (streams too) up to this long before killing it.
        "graceful_shutdown_timeout_s": pool.graceful_shutdown_timeout_s,
        # check_health fails once the engine cannot step; Serve replaces the replica after
        # three failed checks in a row, so period and timeout bound how long that takes.
        **HEALTH_CHECKS,
    })
    a = pool.autoscaling
    if a is None:
        opts["num_replicas"] = pool.num_replicas or 1
    else:
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
            "policy": {
                "policy_function": AUTOSCALING_POLICY,
                "policy_kwargs": {
                    "scale_up_kv_utilization": a.scale_up_kv_utilization,
                    "scale_up_waiting_per_replica": a.scale_up_waiting_per_replica,
                    "scale_down_kv_utilization": a.scale_down_kv_utilization,
                },
            },
        }
    return opts


def check_cluster_fits(config: ServiceConfig) -> None:
    """A replica group that no node (STRICT_PACK) or the whole cluster cannot hold fails here
    with a clear message, not as a replica that never starts. Checked when Ray is up."""
    import ray

    if not ray.is_initialized():
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for pool in config.pools:
        tp = pool.tensor_parallel_size
        if tp == 1 or not pool.is_accelerator:
            continue
        gpus = [int(n.get("GPU", 0)) for n in nodes]
        have = max(gpus, default=0) if pool.placement_strategy == "STRICT_PACK" else sum(gpus)
        if have < tp:
            where = "one node" if pool.placement_strategy == "STRICT_PACK" else "the cluster"
            raise ValueError(f"pool {pool.name!r}: tensor_parallel_size {tp} needs {tp} GPUs "
                             f"on {where}; the most there is {have}")


def build_app(config: ServiceConfig) -> Application:
    """Serve validates ``args`` against ServiceConfig (this annotation) before calling."""
    if isinstance(config, dict):  # called from Python with a plain dict
        config = ServiceConfig.model_validate(config)
    check_cluster_fits(config)
    ingress = config.ingress
    if ingress.engine_in_ingress:
        _, pool = config.single_pool()
        # The pool's resources, replicas or autoscaling, router and grace period; the ingress's
        # own bound on requests (it serves /health, /metrics and the rest too: the engine's
        # bounded queue answers 429 for generation past its capacity).
        opts = {**replica_options(pool), "max_ongoing_requests": max(
            ingress.max_ongoing_requests, pool.max_num_seqs + pool.max_queue_len)}
        opts.pop("max_queued_requests")
        return Ingress.options(name="Ingress", **opts).bind(config.model_dump(), {})
    handles = {}
    for model in config.models:
        for pool in config.pools_for(model):
            name = deployment_name(model.name, pool.name)
            handles[name] = LLMReplicaDeployment.options(
                name=name, **replica_options(pool)
            ).bind(asdict(engine_config(model, pool)), model.name, pool.name,
                   pool.uses_engine_process)
    return Ingress.options(
        name="Ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        # The ingress relays its replicas' streams: it drains as long as they do.
        graceful_shutdown_timeout_s=max(p.graceful_shutdown_timeout_s for p in config.pools),
        **HEALTH_CHECKS,
    ).bind(config.model_dump(), handles)

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


def replica_options(pool: PoolConfig) -> dict[str, Any]:
    """Serve options of a pool's LLMReplica deployment."""
    actor: dict[str, Any] = {"num_cpus": pool.cpus_per_replica}
    if pool.is_accelerator:
        # One replica is one replica group: all of its TP ranks' devices.
        actor["num_gpus"] = pool.tensor_parallel_size
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        # The engine batches and queues itself: let Serve hand it everything up to its
        # bounded queue, which answers 429 past that (max_queued_requests bounds the rest).
        "max_ongoing_requests": pool.max_num_seqs + pool.max_queue_len,
        "max_queued_requests": pool.max_queue_len,
        "request_router_config": RequestRouterConfig(
            request_router_class=REQUEST_ROUTER,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
        # Weights load in __init__; a large checkpoint takes a while.
        "graceful_shutdown_timeout_s": 10,
    }
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


def build_app(config: ServiceConfig) -> Application:
    """Serve validates ``args`` against ServiceConfig (this annotation) before calling."""
    if isinstance(config, dict):  # called from Python with a plain dict
        config = ServiceConfig.model_validate(config)
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
            ).bind(asdict(engine_config(model, pool)), model.name, pool.name)
    return Ingress.options(
        name="Ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
    ).bind(config.model_dump(), handles)

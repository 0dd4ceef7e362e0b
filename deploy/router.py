"""Routing: which pool serves a request (PoolRouter), and which replica in it
(KVHeadroomRouter, a Serve request router).

Both read the replicas' ``record_routing_stats`` (KV utilization, waiting and running
requests), which Serve refreshes every ``ROUTING_STATS_PERIOD_S``. The ingress adds its own
count of in-flight requests per pool, which is fresh between those refreshes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from . import routing_view
from .config import ModelConfig, PoolConfig, ServiceConfig
from .errors import APIError
from .metrics import ReplicaView

ROUTING_STATS_PERIOD_S = 0.5



def replica_load(stats: dict[str, float], ongoing: int | None) -> tuple[float, float, float]:
    """Sort key, least loaded first: queued work, then KV pressure, then requests in flight."""
    return (
        stats.get("waiting_requests", 0.0),
        stats.get("utilization", 0.0),
        float(ongoing if ongoing is not None else stats.get("running_requests", 0.0)),
    )


class KVHeadroomRouter(FIFOMixin, RequestRouter):
    """Sends a request to the replica with the most KV headroom and the shortest queue."""

    # Replicas (unique ids) that answered that their engine is broken; see mark_unavailable.
    unavailable: frozenset[str] = frozenset()

    def initialize_state(self, **kwargs) -> None:
        # Imported here, by absolute name: this class arrives pickled by value, and only a
        # module imported by reference is shared with PoolRouter (see routing_view.py).
        from segserve.deploy import routing_view

        key = (self._deployment_id.app_name, self._deployment_id.name)
        routing_view.ROUTERS[key] = self

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        cache = self.replica_queue_len_cache

        def key(r: RunningReplica) -> tuple[float, float, float]:
            return replica_load(r.routing_stats or {}, cache.get(r.replica_id))

        # A broken replica has an empty KV cache and would look least loaded: it is skipped
        # (until Serve replaces it) unless no other is left, when its 503 says "retry".
        usable = [r for r in candidate_replicas if self.usable(r)] or candidate_replicas
        # One replica per rank: Serve tries the best first and falls back down the list when
        # a replica rejects (at max_ongoing_requests).
        return [[r] for r in sorted(usable, key=key)]

    def usable(self, r: RunningReplica) -> bool:
        """Its engine can step, by its last stats and by what the ingress saw since."""
        return (r.routing_stats or {}).get("healthy", 1.0) > 0 \
            and r.replica_id.unique_id not in self.unavailable

    def mark_unavailable(self, replica_unique_id: str) -> None:
        """The replica answered that its engine is broken: skip it at once, not only once
        its stats say so. Forgotten when it leaves the deployment (Serve replaced it)."""
        live = {rid.unique_id for rid in self.curr_replicas}
        self.unavailable = frozenset({u for u in self.unavailable if u in live}
                                     | {replica_unique_id})  # fmt: skip

    def replica_stats(self) -> list[dict[str, float]]:
        return [r.routing_stats or {} for r in self.curr_replicas.values()]

    def replica_stats_by_id(self) -> dict[str, dict[str, float]]:
        return {rid.unique_id: r.routing_stats or {} for rid, r in self.curr_replicas.items()}


@dataclass
class PoolState:
    pool: PoolConfig
    deployment: str  # the Serve deployment name of (model, pool)
    in_flight: int = 0  # sent by this ingress and not finished

    def saturated(self, app_name: str) -> bool:
        """Every known replica is full: requests are waiting, or KV is nearly exhausted.

        Before the first request the router has no stats; an unknown pool is not saturated, so
        traffic goes to the preferred pool and the stats follow."""
        stats = self._stats(app_name)
        if self.in_flight >= self.pool.max_num_seqs * max(1, len(stats)):
            return True
        if not stats:
            return False
        return all(
            s.get("waiting_requests", 0.0) >= self.pool.spill_waiting_requests
            or s.get("utilization", 0.0) >= self.pool.spill_kv_utilization
            for s in stats
        )

    def load(self, app_name: str) -> float:
        stats = self._stats(app_name)
        waiting = sum(s.get("waiting_requests", 0.0) for s in stats)
        return (self.in_flight + waiting) / max(1, len(stats))

    def _stats(self, app_name: str) -> list[dict[str, float]]:
        router = routing_view.ROUTERS.get((app_name, self.deployment))
        return router.replica_stats() if router is not None else []


def deployment_name(model: str, pool: str) -> str:
    return f"LLM:{model}:{pool}"


class PoolRouter:
    """Picks the pool for a request: the model's pools that match the device preference,
    accelerators first; with ``auto`` a saturated accelerator pool spills to CPU."""

    def __init__(self, config: ServiceConfig, app_name: str = "") -> None:
        self.app_name = app_name
        self.pools: dict[str, list[PoolState]] = {}
        for m in config.models:
            states = [PoolState(p, deployment_name(m.name, p.name)) for p in config.pools_for(m)]
            # Stable sort: accelerator pools first, config order within each kind.
            self.pools[m.name] = sorted(states, key=lambda s: not s.pool.is_accelerator)

    def candidates(self, model: ModelConfig, device: str) -> list[PoolState]:
        states = self.pools.get(model.name, [])
        if device == "gpu":
            states = [s for s in states if s.pool.is_accelerator]
        elif device == "cpu":
            states = [s for s in states if not s.pool.is_accelerator]
        if not states:
            raise APIError(404, f"model {model.name!r} is not served on a {device} pool", "device")
        return states

    def choose(self, model: ModelConfig, device: str = "auto") -> PoolState:
        states = self.candidates(model, device)
        for s in states:
            if not s.saturated(self.app_name):
                return s
        # Everything is busy: the least loaded pool queues it (and answers 429 when its
        # bounded queue is full).
        return min(states, key=lambda s: s.load(self.app_name))

    def replica_views(self) -> list[ReplicaView]:
        """Every known replica's last reported stats (for /metrics), by model and pool."""
        views = []
        for model, states in self.pools.items():
            for s in states:
                router = routing_view.ROUTERS.get((self.app_name, s.deployment))
                stats = router.replica_stats_by_id() if router is not None else {}
                views += [ReplicaView(model, s.pool.name, rid, st)
                          for rid, st in sorted(stats.items())]  # fmt: skip
        return views

    def all_states(self) -> Iterable[PoolState]:
        for states in self.pools.values():
            yield from states

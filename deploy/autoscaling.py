"""KV-pressure autoscaling for a pool's LLMReplica deployment.

Request counts alone misjudge an LLM replica: 8 long requests can fill its KV pool while 64
short ones fit. Replicas report KV utilization and waiting/running requests through
``record_autoscaling_stats`` (replica.py); Serve averages them over ``look_back_period_s`` and
calls this policy. Serve then applies min/max replicas and the up/downscale delays.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext


class KVPressurePolicy:
    """Scale up when replicas are short of KV or have requests waiting; down when idle.

    - up: mean KV utilization > ``scale_up_kv_utilization``, or waiting requests per replica
      >= ``scale_up_waiting_per_replica``. The new size brings utilization back to the target
      (the midpoint of the thresholds) and gives every waiting request's share a replica.
    - down: one replica at a time, when mean utilization < ``scale_down_kv_utilization`` and
      nothing waits (and the remaining replicas would stay under the scale-up threshold); the
      last replica only when nothing runs either (to zero, if min_replicas allows).

    The policy decides how many replicas, not which: Serve 2.60 picks the replica a scale-down
    stops (starting ones first, then by node) and offers no hook for it. A replica stopped with
    requests running drains them (the pool's graceful_shutdown_timeout_s).
    """

    def __init__(
        self,
        scale_up_kv_utilization: float = 0.8,
        scale_up_waiting_per_replica: float = 1.0,
        scale_down_kv_utilization: float = 0.3,
    ) -> None:
        self.up_kv = scale_up_kv_utilization
        self.up_waiting = scale_up_waiting_per_replica
        self.down_kv = scale_down_kv_utilization

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        kv = list((metrics.get("kv_utilization") or {}).values())
        waiting = sum((metrics.get("waiting_requests") or {}).values())
        running = sum((metrics.get("running_requests") or {}).values())
        state = {"kv_utilization": _mean(kv), "waiting_requests": waiting}
        return self.desired(current, kv, waiting, running), state

    def desired(self, current: int, kv: list[float], waiting: float, running: float) -> int:
        """The decision on plain numbers (also what the tests drive)."""
        if current == 0:
            return 1 if waiting or running else 0
        if not kv:
            # No replica has reported yet (starting, or metrics late): no evidence either way.
            return current
        mean_kv = _mean(kv)
        if mean_kv > self.up_kv or waiting / current >= self.up_waiting:
            target_kv = (self.up_kv + self.down_kv) / 2
            by_kv = math.ceil(current * mean_kv / target_kv) if mean_kv > self.up_kv else current
            by_queue = current + math.ceil(waiting / max(self.up_waiting, 1.0))
            return max(current + 1, by_kv, by_queue if waiting / current >= self.up_waiting
                       else current)  # fmt: skip
        if mean_kv < self.down_kv and waiting == 0:
            if current == 1:
                # Only an idle pool goes to zero (Serve clamps this to min_replicas).
                return 0 if running == 0 else 1
            # Would the survivors stay calm? Their utilization rises by current/(current-1).
            if mean_kv * current / (current - 1) < self.up_kv:
                return current - 1
        return current


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0

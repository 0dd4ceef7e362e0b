"""KVPressurePolicy (deploy/autoscaling.py) on hand-computed cases.

Defaults: scale up above 0.8 mean KV utilization or at >= 1 waiting request per replica; scale
down below 0.3. The KV target after scaling up is the thresholds' midpoint, 0.55.
"""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingContext
from segserve.deploy.autoscaling import KVPressurePolicy

P = KVPressurePolicy()  # up 0.8, waiting 1.0, down 0.3


@pytest.mark.parametrize(
    "current, kv, expected",
    [
        # ceil(2 * 0.9 / 0.55) = ceil(3.27) = 4
        (2, [0.9, 0.9], 4),
        # mean 0.9: ceil(4 * 0.9 / 0.55) = ceil(6.55) = 7
        (4, [0.85, 0.95, 0.9, 0.9], 7),
        # barely pressured: ceil(1 * 0.81 / 0.55) = ceil(1.47) = 2 = current + 1
        (1, [0.81], 2),
        # mean 0.9 over 5: ceil(5 * 0.9 / 0.55) = ceil(8.18) = 9
        (5, [0.7, 0.9, 1.0, 0.95, 0.95], 9),
    ],
)
def test_scale_up_on_kv(current, kv, expected):
    assert P.desired(current, kv, waiting=0, running=5) == expected


def test_scale_up_target_uses_both_thresholds():
    p = KVPressurePolicy(scale_up_kv_utilization=0.6, scale_down_kv_utilization=0.2)
    # target 0.4: ceil(3 * 0.7 / 0.4) = ceil(5.25) = 6
    assert p.desired(3, [0.7, 0.7, 0.7], 0, 0) == 6


@pytest.mark.parametrize(
    "up_waiting, current, waiting, expected",
    [
        (1.0, 2, 2, 4),  # exactly 1 per replica triggers: 2 + ceil(2 / 1)
        (1.0, 2, 3, 5),  # 2 + 3
        (4.0, 2, 8, 4),  # 4 per replica: 2 + ceil(8 / 4)
        (4.0, 2, 9, 5),  # 2 + ceil(9 / 4) = 2 + 3
        (0.5, 4, 2, 6),  # thresholds under 1 count one replica per waiting request: 4 + 2
    ],
)
def test_scale_up_on_waiting(up_waiting, current, waiting, expected):
    p = KVPressurePolicy(scale_up_waiting_per_replica=up_waiting)
    assert p.desired(current, [0.5] * current, waiting, running=current) == expected


def test_waiting_below_threshold_holds():
    # 3 waiting over 4 replicas = 0.75 < 1, KV 0.5 between the thresholds
    assert P.desired(4, [0.5] * 4, waiting=3, running=8) == 4
    p = KVPressurePolicy(scale_up_waiting_per_replica=4.0)
    assert p.desired(2, [0.5, 0.5], waiting=7, running=8) == 2  # 3.5 < 4


def test_kv_and_waiting_take_the_larger():
    # by KV: ceil(2 * 0.9 / 0.55) = 4; by queue: 2 + 4 = 6
    assert P.desired(2, [0.9, 0.9], waiting=4, running=4) == 6
    # by KV: ceil(4 * 0.99 / 0.55) = ceil(7.2) = 8; by queue (5 waiting): 4 + 5 = 9
    assert P.desired(4, [0.99] * 4, waiting=5, running=4) == 9
    assert P.desired(4, [0.99] * 4, waiting=3, running=4) == 8  # queue under threshold


def test_pressured_never_below_current_plus_one():
    for current in range(1, 12):
        assert P.desired(current, [0.801] * current, 0, 0) >= current + 1
        assert P.desired(current, [0.1] * current, current, 0) >= current + 1


@pytest.mark.parametrize(
    "current, kv, expected",
    [
        (3, [0.1, 0.2, 0.0], 2),  # mean 0.1; survivors 0.15 < 0.8
        (2, [0.29, 0.29], 1),  # survivors 0.58 < 0.8
        (5, [0.0] * 5, 4),  # one at a time, even when idle
    ],
)
def test_scale_down_by_one(current, kv, expected):
    assert P.desired(current, kv, waiting=0, running=0) == expected


def test_scale_down_blocked_by_waiting():
    # mean 0.1 but one request waits (1/3 < 1, so no scale up either)
    assert P.desired(3, [0.1, 0.1, 0.1], waiting=1, running=3) == 3


def test_scale_down_only_when_survivors_stay_calm():
    p = KVPressurePolicy(scale_up_kv_utilization=0.5, scale_down_kv_utilization=0.4)
    # 2 replicas at 0.3: survivors 0.3 * 2 / 1 = 0.6 >= 0.5 -> hold
    assert p.desired(2, [0.3, 0.3], 0, 0) == 2
    # 3 replicas at 0.3: survivors 0.3 * 3 / 2 = 0.45 < 0.5 -> 2
    assert p.desired(3, [0.3, 0.3, 0.3], 0, 0) == 2


@pytest.mark.parametrize(
    "current, kv, waiting",
    [
        (3, [0.5, 0.5, 0.5], 0),  # between the thresholds
        (2, [0.8, 0.8], 1),  # exactly at up (not above); 0.5 waiting per replica
        (2, [0.3, 0.3], 0),  # exactly at down (not below)
        (1, [0.1], 0),  # one replica never goes below one by KV
    ],
)
def test_hold(current, kv, waiting):
    assert P.desired(current, kv, waiting, running=1) == current


def test_zero_replicas():
    assert P.desired(0, [], waiting=2, running=0) == 1
    assert P.desired(0, [], waiting=0, running=1) == 1
    assert P.desired(0, [], waiting=0, running=0) == 0


def test_idle_single_replica_may_scale_to_zero():
    # Serve clamps the answer to min_replicas, so 0 is safe to return for min_replicas >= 1.
    assert P.desired(1, [0.0], waiting=0, running=0) == 0


# ----- __call__ with Serve's AutoscalingContext ------------------------------------------------
DEP = DeploymentID(name="LLM:m:gpu", app_name="segserve")
R = [ReplicaID(f"replica{i}", DEP) for i in range(3)]


def ctx(current: int, metrics, policy_state=None) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=R[:current],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=10,
        policy_state=policy_state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=None,
    )


def test_call_scales_up_from_metrics():
    metrics = {
        "kv_utilization": {R[0]: 0.95, R[1]: 0.85},
        "waiting_requests": {R[0]: 3.0, R[1]: 1.0},
        "running_requests": {R[0]: 10.0, R[1]: 6.0},
    }
    n, state = P(ctx(2, metrics))
    # by KV ceil(2 * 0.9 / 0.55) = 4; by queue (4 waiting, 2 per replica) 2 + 4 = 6
    assert n == 6
    assert state["kv_utilization"] == pytest.approx(0.9)
    assert state["waiting_requests"] == 4.0


def test_call_scales_down_from_metrics():
    metrics = {
        "kv_utilization": {R[0]: 0.1, R[1]: 0.2, R[2]: 0.0},
        "waiting_requests": {R[0]: 0.0, R[1]: 0.0, R[2]: 0.0},
        "running_requests": {R[0]: 1.0, R[1]: 2.0, R[2]: 0.0},
    }
    n, state = P(ctx(3, metrics))
    assert n == 2
    assert state == {"kv_utilization": pytest.approx(0.1), "waiting_requests": 0.0}


def test_call_with_lazy_metrics():
    metrics = {"kv_utilization": {R[0]: 0.5}, "waiting_requests": {R[0]: 1.0}}
    n, state = P(ctx(1, lambda: metrics))  # Serve passes a callable
    assert n == 2  # 1 waiting per replica: 1 + 1
    assert state == {"kv_utilization": 0.5, "waiting_requests": 1.0}


def test_call_without_metrics():
    assert P(ctx(1, None)) == (1, {"kv_utilization": 0.0, "waiting_requests": 0})
    assert P(ctx(0, {})) == (0, {"kv_utilization": 0.0, "waiting_requests": 0})
    # no replica reported yet: no evidence, so hold (never read missing metrics as idle)
    assert P(ctx(2, {}))[0] == 2


def test_call_zero_replicas_with_running():
    n, _ = P(ctx(0, {"running_requests": {R[0]: 2.0}}))
    assert n == 1

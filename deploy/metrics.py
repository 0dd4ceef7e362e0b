"""The service's metrics as Prometheus text on the HTTP port (``GET /metrics``), where vLLM users
and load testers look for them.

How they reach the ingress: every replica adds a snapshot of its metrics (KV gauges and running
totals, requests by final status, TTFT and TPOT histogram buckets) to the routing stats it
reports every ``ROUTING_STATS_PERIOD_S`` (``LLMReplica.record_routing_stats``). Serve's
controller already pushes every replica's routing stats to the request router of every handle,
so each ingress replica holds the whole deployment's view: a scrape costs no replica call, any
ingress replica answers for all of them, and a replica that goes away drops out of the next
scrape. Series are per replica (label ``replica``), so each counter only ever grows. The same
metrics also go to Ray's Prometheus endpoint through ``ray.util.metrics`` (replica.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# The engine's stats() keys exported as gauges, and its running totals exported as counters.
KV_GAUGES = (
    "blocks_total", "blocks_used", "blocks_free", "blocks_cached", "utilization",
    "tokens_logical", "tokens_stored", "tokens_saved_by_sharing", "waiting_seqs",
    "running_seqs", "waiting_requests", "running_requests", "bytes_per_token",
    "capacity_bytes", "used_bytes", "stored_bytes",
)  # fmt: skip
KV_COUNTERS = ("prefix_cache_hit_tokens", "preemptions", "evictions")
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = {  # snapshot key -> (Prometheus name, help)
    "ttft": ("segserve_time_to_first_token_seconds", "Time to first token (engine side)"),
    "tpot": ("segserve_time_per_output_token_seconds",
             "Mean time per output token after the first, per request"),
}  # fmt: skip
_REQUESTS = "requests_"  # snapshot key prefix of the per-status request counts
# vLLM's names for the same series, so its dashboards and tools find them.
VLLM_GAUGES = {"running_requests": "vllm:num_requests_running",
               "waiting_requests": "vllm:num_requests_waiting",
               "utilization": "vllm:kv_cache_usage_perc"}  # fmt: skip
VLLM_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds",
                   "tpot": "vllm:time_per_output_token_seconds"}  # fmt: skip


class LatencyHistogram:
    """Cumulative bucket counts kept in the replica, for its snapshot."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.counts = [0] * len(LATENCY_BOUNDS)  # observations <= each bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(LATENCY_BOUNDS):
            if value <= bound:
                self.counts[i] += 1

    def snapshot(self) -> dict[str, float]:
        out = {f"{self.key}_le_{i}": float(c) for i, c in enumerate(self.counts)}
        out[f"{self.key}_sum"] = self.sum
        out[f"{self.key}_count"] = float(self.count)
        return out


def metrics_snapshot(stats: dict[str, float], histograms: Iterable[LatencyHistogram],
                     requests: Counter[str]) -> dict[str, float]:  # fmt: skip
    """A replica's metrics as flat routing-stats entries."""
    out = {k: float(stats[k]) for k in (*KV_GAUGES, *KV_COUNTERS) if k in stats}
    for h in histograms:
        out.update(h.snapshot())
    out.update({_REQUESTS + status: float(n) for status, n in requests.items()})
    return out


@dataclass(frozen=True)
class ReplicaView:
    model: str
    pool: str
    replica: str
    stats: dict[str, float]  # a metrics_snapshot (plus the routing keys)


class _Collector:
    def __init__(self, views: list[ReplicaView]) -> None:
        self.views = views

    def collect(self) -> Iterable:
        labels = ["model", "pool", "replica"]
        rows = [([v.model, v.pool, v.replica], v) for v in self.views]
        for k in KV_GAUGES:
            g = GaugeMetricFamily(f"segserve_kv_{k}", f"KV manager: {k}", labels=labels)
            for values, v in rows:
                if k in v.stats:
                    g.add_metric(values, v.stats[k])
            yield g
        for k in KV_COUNTERS:
            c = CounterMetricFamily(f"segserve_kv_{k}", f"KV manager: {k}", labels=labels)
            for values, v in rows:
                if k in v.stats:
                    c.add_metric(values, v.stats[k])
            yield c
        requests = CounterMetricFamily("segserve_requests", "Requests by final status",
                                       labels=[*labels, "status"])  # fmt: skip
        for values, v in rows:
            for key, n in sorted(v.stats.items()):
                if key.startswith(_REQUESTS):
                    requests.add_metric([*values, key[len(_REQUESTS):]], n)
        yield requests
        for key, (name, doc) in HISTOGRAMS.items():
            yield self._histogram(name, doc, key, labels, rows)
        vllm_labels = ["model_name", "pool", "replica"]
        for k, name in VLLM_GAUGES.items():
            g = GaugeMetricFamily(name, f"segserve_kv_{k}, under vLLM's name", labels=vllm_labels)
            for values, v in rows:
                if k in v.stats:
                    g.add_metric(values, v.stats[k])
            yield g
        for key, name in VLLM_HISTOGRAMS.items():
            yield self._histogram(name, f"{HISTOGRAMS[key][0]}, under vLLM's name", key,
                                  vllm_labels, rows)  # fmt: skip

    @staticmethod
    def _histogram(name: str, doc: str, key: str, labels: list[str],
                   rows: list[tuple[list[str], ReplicaView]]) -> HistogramMetricFamily:  # fmt: skip
        h = HistogramMetricFamily(name, doc, labels=labels)
        for values, v in rows:
            s = v.stats
            if f"{key}_count" not in s:
                continue
            buckets = [(str(b), s[f"{key}_le_{i}"]) for i, b in enumerate(LATENCY_BOUNDS)]
            buckets.append(("+Inf", s[f"{key}_count"]))
            h.add_metric(values, buckets, s[f"{key}_sum"])
        return h


def render(views: list[ReplicaView]) -> bytes:
    """Prometheus text exposition of every replica's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(views))
    return generate_latest(registry)

"""k8s/dashboards/segserve.json queries only metrics the service exports, and covers what an
operator watches; the replica's token counters (the dashboard's tokens/s) count what it streams.

The exported names come from the metric objects a replica really creates (ReplicaMetrics), in
the form Ray's Prometheus endpoint gives them: a `ray_` prefix, and `_bucket`/`_sum`/`_count`
series for histograms (tests/test_serve.py scrapes that endpoint live)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from ray.util import metrics as ray_metrics
from segserve.actors.config import EngineConfig
from segserve.deploy.replica import KV_COUNTERS, KV_GAUGES, LLMReplica, ReplicaMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "dashboards" / "segserve.json"
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "clamp_min", "clamp_max", "label_values", "offset", "bool",
}  # fmt: skip


def exported_series() -> set[str]:
    """Prometheus series names of every metric a replica defines."""
    m = ReplicaMetrics("model", "pool")
    found = []
    for value in vars(m).values():
        found += value.values() if isinstance(value, dict) else [value]
    names = set()
    for metric in found:
        if not isinstance(metric, ray_metrics.Metric):
            continue
        base = "ray_" + metric.info["name"]
        if isinstance(metric, ray_metrics.Histogram):
            names |= {base + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(base)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label
    matchers, ranges and grouping clauses are taken out, minus PromQL's own words."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(([^,)]*)(,[^)]*)?\)", r"\1", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_metric_name_extraction():
    """The extractor itself, on hand-written PromQL."""
    expr = (
        'histogram_quantile(0.95, sum by (le, pool) (rate(ray_a_bucket{model=~"$m",x="a b"}'
        "[$__rate_interval]))) / on (pool) count(ray_b) + label_values(ray_c, model)"
    )
    assert metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c"}


def test_exported_series_include_the_kv_and_latency_metrics():
    names = exported_series()
    assert {f"ray_segserve_kv_{k}" for k in KV_GAUGES} <= names
    assert {f"ray_segserve_kv_{k}_total" for k in KV_COUNTERS} <= names
    assert "ray_segserve_time_to_first_token_seconds_bucket" in names
    assert "ray_segserve_requests_total" in names


def test_dashboard_queries_only_exported_metrics():
    exported = exported_series()
    queries = dashboard_queries()
    assert len(queries) >= 10
    used = set().union(*(metric_names(q) for q in queries))
    assert used, "no metric found in the dashboard's queries"
    assert used <= exported, f"not exported by the service: {sorted(used - exported)}"


@pytest.mark.parametrize("topic,needles", [
    ("TTFT", ["histogram_quantile", "ray_segserve_time_to_first_token_seconds_bucket"]),
    ("TPOT", ["histogram_quantile", "ray_segserve_time_per_output_token_seconds_bucket"]),
    ("tokens/s", ["rate(ray_segserve_generation_tokens_total"]),
    ("queue depth", ["ray_segserve_kv_waiting_requests"]),
    ("KV used", ["ray_segserve_kv_blocks_used"]),
    ("KV free", ["ray_segserve_kv_blocks_free"]),
    ("KV cached", ["ray_segserve_kv_blocks_cached"]),
    ("preemptions", ["rate(ray_segserve_kv_preemptions_total"]),
    ("replicas per pool", ["count by (model, pool)"]),
])  # fmt: skip
def test_dashboard_covers(topic, needles):
    assert any(all(n in q for n in needles) for q in dashboard_queries()), topic


@pytest.fixture
def published(monkeypatch):
    """What the replica's counters publish: (metric name, increment) pairs."""
    out = []

    def record(self, value=1.0, tags=None):
        out.append((self.info["name"], value))

    monkeypatch.setattr(ray_metrics.Counter, "inc", record)
    return out


def _tokens(published) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, value in published:
        if name.endswith("_tokens_total") and "kv_" not in name:
            totals[name] = totals.get(name, 0) + value
    return totals


def test_token_counters_flush_what_was_counted(published):
    m = ReplicaMetrics("model", "pool")
    m.count_tokens("prompt", 7)
    m.count_tokens("generation", 1)
    m.count_tokens("generation", 3)
    m.export({})
    assert sorted(published) == [("segserve_generation_tokens_total", 4),
                                 ("segserve_prompt_tokens_total", 7)]  # fmt: skip
    published.clear()
    m.export({})  # nothing new: nothing published
    assert published == []


def test_replica_counts_the_tokens_it_streams(published):
    engine = EngineConfig(model="demo", device="cpu", dtype="float32", num_kv_blocks=64,
                          max_model_len=256)
    replica = LLMReplica(asdict(engine), "demo", "cpu")
    prompt = [5, 6, 7, 8, 9]

    async def run() -> int:
        streamed = 0
        sampling = {"max_tokens": 6, "temperature": 0.0, "n": 2, "ignore_eos": True}
        async for item in replica.generate(prompt, sampling, "r1"):
            # n=2: a step's deltas of both samples come as one list (replica.coalesce)
            for d in item if isinstance(item, list) else [item]:
                assert "error" not in d, d
                streamed += len(d["token_ids"])
        return streamed

    streamed = asyncio.run(run())
    assert streamed == 12  # two samples of six tokens
    replica.metrics.export(replica.engine.stats())
    assert _tokens(published) == {"segserve_prompt_tokens_total": len(prompt),
                                  "segserve_generation_tokens_total": streamed}  # fmt: skip

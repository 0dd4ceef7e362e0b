"""LLMReplica: the Serve deployment that hosts one engine (one replica group).

The ingress sends it token ids and SamplingParams kwargs; it streams back plain dicts (one per
engine delta), so nothing engine-specific crosses the Ray boundary. It reports KV pressure to
the request router (``record_routing_stats``), to the autoscaler (``record_autoscaling_stats``)
and to Prometheus (``ray.util.metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.util import metrics

from ..actors.async_engine import AsyncEngine, EngineBroken
from ..actors.config import EngineConfig
from ..actors.engine import QueueFull
from ..actors.engine_process import EngineProcess
from ..actors.outputs import Delta
from ..actors.sampling_params import SamplingParams
from .caller_watch import Caller, CallerWatch
from .errors import APIError, engine_error_param
from .metrics import (
    HISTOGRAMS,
    KV_COUNTERS,
    KV_GAUGES,
    LATENCY_BOUNDS,
    LatencyHistogram,
    metrics_snapshot,
)

logger = logging.getLogger(__name__)

# What the request router reads (router.replica_load) and the autoscaler needs.
ROUTING_KEYS = ("utilization", "waiting_requests", "running_requests")
# segserve_{kind}_tokens_total: prompt tokens admitted, output tokens streamed.
TOKEN_COUNTERS = ("prompt", "generation")


class ReplicaMetrics:
    """Prometheus metrics of one replica, tagged with its model and pool."""

    def __init__(self, model: str, pool: str) -> None:
        tags = ("model", "pool")
        self.tags = {"model": model, "pool": pool}
        self.gauges = {
            k: metrics.Gauge(f"segserve_kv_{k}", f"KV manager: {k}", tag_keys=tags)
            for k in KV_GAUGES
        }
        self.counters = {
            k: metrics.Counter(f"segserve_kv_{k}_total", f"KV manager: {k}", tag_keys=tags)
            for k in KV_COUNTERS
        }
        self._last_counts = dict.fromkeys(KV_COUNTERS, 0.0)
        self._ttft = metrics.Histogram(
            HISTOGRAMS["ttft"][0], HISTOGRAMS["ttft"][1], boundaries=list(LATENCY_BOUNDS),
            tag_keys=tags,
        )  # fmt: skip
        self._tpot = metrics.Histogram(
            HISTOGRAMS["tpot"][0], HISTOGRAMS["tpot"][1], boundaries=list(LATENCY_BOUNDS),
            tag_keys=tags,
        )  # fmt: skip
        self.requests = metrics.Counter(
            "segserve_requests_total", "Requests by final status",
            tag_keys=(*tags, "status"),
        )  # fmt: skip
        # Token throughput. Counted per delta into plain ints and flushed with the KV stats
        # once a second, so the stream's hot path pays no metrics call per token.
        self.tokens = {
            kind: metrics.Counter(f"segserve_{kind}_tokens_total", f"{kind.capitalize()} "
                                  "tokens processed", tag_keys=tags)
            for kind in TOKEN_COUNTERS
        }  # fmt: skip
        self._pending_tokens = dict.fromkeys(TOKEN_COUNTERS, 0)
        # The same, kept here too for the HTTP port's /metrics (see metrics.py).
        self.local_ttft, self.local_tpot = LatencyHistogram("ttft"), LatencyHistogram("tpot")
        self.request_counts: Counter[str] = Counter()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds, tags=self.tags)
        self.local_ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self._tpot.observe(seconds, tags=self.tags)
        self.local_tpot.observe(seconds)

    def snapshot(self, stats: dict[str, float]) -> dict[str, float]:
        return metrics_snapshot(stats, (self.local_ttft, self.local_tpot), self.request_counts)

    def export(self, stats: dict[str, float]) -> None:
        for k, g in self.gauges.items():
            if k in stats:
                g.set(float(stats[k]), tags=self.tags)
        for k, c in self.counters.items():
            # The engine reports running totals; Prometheus counters take increments.
            delta = float(stats.get(k, 0.0)) - self._last_counts[k]
            if delta > 0:
                c.inc(delta, tags=self.tags)
                self._last_counts[k] += delta
        for kind, n in self._pending_tokens.items():
            if n:
                self.tokens[kind].inc(n, tags=self.tags)
                self._pending_tokens[kind] = 0

    def count_tokens(self, kind: str, n: int) -> None:
        """Add ``n`` tokens of ``kind`` (TOKEN_COUNTERS); ``export`` publishes them."""
        self._pending_tokens[kind] += n

    def finished(self, status: str) -> None:
        self.requests.inc(1, tags={**self.tags, "status": status})
        self.request_counts[status] += 1


def delta_to_wire(d: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": d.index, "token_ids": d.token_ids, "text": d.text}
    if d.finish_reason is not None:
        out["finish_reason"] = d.finish_reason
    if d.logprobs is not None:
        out["logprobs"] = [(lp.token_id, lp.logprob, lp.top) for lp in d.logprobs]
    if d.request_done:
        out["num_cached_tokens"] = d.num_cached_tokens
    if d.prompt_logprobs is not None:
        out["prompt_logprobs"] = [(lp.token_id, lp.logprob, lp.top) for lp in d.prompt_logprobs]
    return out


def coalesce(items: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """Wire deltas that are ready together as one stream item: consecutive deltas of one
    sequence become one (their tokens, text and log-probs joined; the last one's finish), and
    deltas of several sequences (n > 1) a list, which the ingress unpacks (streams.py)."""
    out: list[dict[str, Any]] = []
    for item in items:
        prev = out[-1] if out else None
        if prev is None or prev["index"] != item["index"] or "finish_reason" in prev:
            out.append(item)
            continue
        prev["token_ids"] = prev["token_ids"] + item["token_ids"]
        prev["text"] += item["text"]
        if "logprobs" in item:
            prev["logprobs"] = prev.get("logprobs", []) + item["logprobs"]
        for key in ("finish_reason", "num_cached_tokens"):  # the sequence's / request's end
            if key in item:
                prev[key] = item[key]
    return out[0] if len(out) == 1 else out


def _internal_error(request_id: str) -> APIError:
    return APIError(500, f"internal error while generating (request id {request_id}); "
                    "the server log has the cause")  # fmt: skip


class LLMReplica:
    """One engine. Serve options (resources, replicas, autoscaling, router) come from
    ``app.build_app``."""

    METRICS_PERIOD_S = 1.0

    def __init__(self, engine_config: dict[str, Any], model: str, pool: str,
                 engine_process: bool = False) -> None:  # fmt: skip
        """``engine_process``: the engine steps in a child process (engine_process.py), not in
        a thread of this one."""
        self.model, self.pool = model, pool
        config = EngineConfig(**engine_config)
        self.engine = EngineProcess(config) if engine_process else AsyncEngine(config)
        self.max_model_len = self.engine.max_model_len
        self.metrics = ReplicaMetrics(model, pool)
        self._metrics_task: asyncio.Task | None = None
        self.callers = CallerWatch()
        self._last_stats = self.engine.stats()  # the engine is idle: its stats are complete
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve (tests)
            self.replica_id = ""
        logger.info("LLMReplica %s/%s ready: %s", model, pool, self._last_stats)

    def __del__(self) -> None:
        # Serve calls this when the replica stops: a replica group's TPWorker actors go with it
        # (they are this actor's children and would die with it anyway; this is the clean way).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def _ensure_metrics_loop(self) -> None:
        if self._metrics_task is None or self._metrics_task.done():
            self._metrics_task = asyncio.get_running_loop().create_task(self._export_loop())

    async def _export_loop(self) -> None:
        while True:
            try:
                self.metrics.export(self._stats())
            except Exception:  # metrics must never take the replica down
                logger.exception("metrics export failed")
            await asyncio.sleep(self.METRICS_PERIOD_S)

    async def generate(
        self, prompt_ids: list[int], sampling: dict[str, Any], request_id: str,
        caller: Caller | None = None,
    ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Stream one request: a dict per engine delta, or a single ``{"error": ...}``.

        Cancelling the stream (the client went away) closes the engine iterator, which aborts
        the request and frees its KV blocks. ``caller``: the ingress replica that made the call
        (caller_watch.py): if it dies, the call is cancelled the same way."""
        self._ensure_metrics_loop()
        task = asyncio.current_task()
        if caller is not None and task is not None:
            self.callers.add(caller, task)
        start = time.perf_counter()
        first = last = None
        later_tokens = 0  # tokens after the first delta's, for TPOT
        admitted = False
        status = "error"
        stream = None
        try:
            stream = self.engine.generate_ready(prompt_ids, SamplingParams(**sampling),
                                                request_id)  # fmt: skip
            async for ready in stream:
                now = time.perf_counter()
                if not admitted:  # the first delta: the engine took the prompt
                    admitted = True
                    self.metrics.count_tokens("prompt", len(prompt_ids))
                for d in ready:
                    if d.token_ids:
                        self.metrics.count_tokens("generation", len(d.token_ids))
                        if first is None:
                            first = now
                            self.metrics.observe_ttft(now - start)
                        else:
                            later_tokens += len(d.token_ids)
                        last = now
                    status = d.finish_reason or status
                    if d.finish_reason == "error" and d.error is not None:
                        status = "rejected"  # the request's constraints conflict: its own doing
                        yield {"error": APIError(400, d.error, "structured").to_dict()}
                        return
                    if d.finish_reason == "error":
                        # The engine logged the cause under this request id; the client gets
                        # the id, a 500 and none of the internals. The engine has ended the
                        # request.
                        logger.error("request %s failed in the engine", request_id)
                        yield {"error": _internal_error(request_id).to_dict()}
                        return
                # Every delta that is ready goes as one stream item: each item costs a hop.
                yield coalesce([delta_to_wire(d) for d in ready])
        except (ValueError, TypeError) as e:
            status = "rejected"
            yield {"error": APIError(400, str(e), engine_error_param(str(e))).to_dict()}
        except QueueFull as e:
            status = "rejected"
            yield {"error": APIError(429, str(e)).to_dict()}
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away (or closed us)
            status = "abort"
            raise
        except EngineBroken:  # check_health fails too: Serve is replacing this replica
            logger.exception("request %s refused: the engine is broken", request_id)
            # Nothing was generated: the ingress sends it to another replica, and its router
            # skips this one from now on (streams.open_stream).
            yield {"error": APIError(503, "the replica is unavailable, retry (request id "
                                     f"{request_id})").to_dict(),
                   "unavailable_replica": self.replica_id}  # fmt: skip
        except Exception:
            logger.exception("request %s failed in the replica", request_id)
            yield {"error": _internal_error(request_id).to_dict()}
        finally:
            if caller is not None and task is not None:
                self.callers.discard(caller, task)
            # Counted first: a cancelled call may be cancelled again inside the await below.
            self.metrics.finished(status)
            if later_tokens:
                self.metrics.observe_tpot((last - first) / later_tokens)
            if stream is not None:  # closed at once, not when collected: it aborts the request
                await stream.aclose()

    def _stats(self) -> dict[str, float]:
        """The engine's stats, or the last complete ones. While the engine's first step runs
        it has taken no snapshot yet and ``AsyncEngine.stats()`` is empty (reading live state
        then would race the step): that used to raise KeyError 'utilization' in
        record_routing_stats at startup."""
        s = self.engine.stats()
        if all(k in s for k in ROUTING_KEYS):
            self._last_stats = s
        return self._last_stats

    async def stats(self) -> dict[str, float]:
        return self._stats()

    async def info(self) -> dict[str, Any]:
        return {"model": self.model, "pool": self.pool, "max_model_len": self.max_model_len}

    def record_routing_stats(self) -> dict[str, float]:
        """Read by the request router (router.KVHeadroomRouter), the pool spill check, and
        the ingress's /metrics (this replica's metrics ride along: see metrics.py)."""
        s = self._stats()
        return {**self.metrics.snapshot(s), **{k: float(s[k]) for k in ROUTING_KEYS},
                "healthy": float(self.engine.healthy)}  # fmt: skip

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for autoscaling.KVPressurePolicy."""
        s = self._stats()
        return {
            "kv_utilization": float(s["utilization"]),
            "waiting_requests": float(s["waiting_requests"]),
            "running_requests": float(s["running_requests"]),
        }

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises: its engine cannot step (its loop has
        stopped, a fault persisted, a step hangs, or its idle device fails a probe)."""
        await self.engine.probe()


LLMReplicaDeployment = serve.deployment(LLMReplica, name="LLMReplica")

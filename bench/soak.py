#!/usr/bin/env python
"""Soak: a bounded, self-stopping mixed workload over HTTP and gRPC for a given duration.

    python bench/soak.py --duration 600            # its own local Ray Serve, the demo model
    python bench/soak.py --duration 60 --json soak.json

``--concurrency`` workers each loop until the duration is up, picking at random: HTTP streams
(some with a shared prefix, some with a per-tenant ``cache_salt``), HTTP unary calls with n > 1,
beam search, gRPC unary and streams, cancels (a stream closed after its first event), and bad
requests (which must be refused with a 4xx / INVALID_ARGUMENT). Then it waits for the replica
to go idle and reports requests by kind and outcome, leaked KV blocks (blocks still used once
idle: must be 0), the resident memory of every Serve process at the start and the end, sampled
every ``--rss-every`` seconds in between (the series, its growth, and its least-squares slope
over the run's second half: does it level off?), and p50/p99 latency of the requests that
completed. ``--warmup`` seconds of the same load come first, outside the baseline (default 5:
the first requests compile and allocate). ``--serve-mode direct`` runs Serve with direct
ingress (the clients call the ingress replica's own ports; deploy.launch.SERVE_MODES). It exits
1 if anything unexpected happened (a 5xx, an error event, a leaked block, a bad request
accepted).

``run_soak`` is the workload alone, against a service already running (tests/test_serve.py
runs it briefly against its own Serve instance).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

MODEL = "demo"


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def serve_processes() -> dict[str, int]:
    """The pids of the cluster's Serve actors (replicas, ingress, proxy, controller), asked of
    each actor itself (the state API needs the dashboard, which the soak does not start)."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_"):
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            out[a["name"]] = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    # A replica's engine process (--engine-process) holds the engine's memory: sampled too.
    from segserve.actors.engine_process import engine_processes

    parents = {pid: name for name, pid in out.items()}
    for pid, ppid in engine_processes().items():
        if ppid in parents:
            out[f"{parents[ppid]} engine process"] = pid
    return out


class RssSampler:
    """Every ``every_s`` seconds (in a thread, so a busy event loop cannot delay it), the RSS of
    each process of ``pids``: ``series[name]`` = [(seconds since start, MiB), ...]."""

    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        self.pids, self.every_s = pids, every_s
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        t = round(time.monotonic() - self._t0, 1)
        for name, pid in self.pids.items():
            mib = _rss_mib(pid)
            if mib is not None:
                self.series[name].append((t, round(mib, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, series in self.series.items():
            if not series:
                continue
            start, end = series[0][1], series[-1][1]
            half = [(t, m) for t, m in series if t >= series[-1][0] / 2]
            out[name] = {"start": start, "end": end, "max": max(m for _, m in series),
                         "growth_pct": round(100 * (end / start - 1), 2),
                         "slope_last_half_mib_per_min": _slope_per_min(half),
                         "series": series}  # fmt: skip
        return out


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mm = statistics.fmean(m for _, m in points)
    var = sum((t - mt) ** 2 for t, _ in points)
    cov = sum((t - mt) * (m - mm) for t, m in points)
    return round(60 * cov / var, 3) if var else None


def format_rss(rss: dict[str, dict[str, Any]]) -> str:
    lines = ["RSS per Serve process (MiB): start -> end (growth), max, slope over the second "
             "half; then the series (s: MiB)"]  # fmt: skip
    for name, r in rss.items():
        slope = r["slope_last_half_mib_per_min"]
        lines.append(f"  {name}: {r['start']:.1f} -> {r['end']:.1f} ({r['growth_pct']:+.1f}%), "
                     f"max {r['max']:.1f}, "
                     + (f"{slope:+.2f} MiB/min" if slope is not None else "slope n/a"))
        lines.append("    " + ", ".join(f"{t:g}: {m:.1f}" for t, m in r["series"]))
    return "\n".join(lines)


class _Outcomes:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.latency: list[float] = []
        self.unexpected: list[str] = []

    def add(self, kind: str, outcome: str, start: float | None = None, why: str = "") -> None:
        self.counts[(kind, outcome)] += 1
        if outcome == "ok" and start is not None:
            self.latency.append(time.perf_counter() - start)
        if outcome == "unexpected":
            self.unexpected.append(f"{kind}: {why}"[:300])


async def _http(session: Any, base: str, kind: str, body: dict[str, Any],
                out: _Outcomes) -> None:  # fmt: skip
    start = time.perf_counter()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    async with session.post(base + path, json={"model": MODEL, **body}) as resp:
        if kind == "bad":
            text = await resp.text()
            ok = 400 <= resp.status < 500
            return out.add(kind, "refused" if ok else "unexpected", why=f"{resp.status} {text}")
        if resp.status == 429:
            return out.add(kind, "429")
        if resp.status != 200:
            return out.add(kind, "unexpected", why=f"{resp.status} {await resp.text()}")
        if not body.get("stream"):
            await resp.json()
            return out.add(kind, "ok", start)
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"error"' in line[:20]:
                return out.add(kind, "unexpected", why=line.decode())
            if kind == "cancel" and line.startswith(b"data: "):
                return out.add(kind, "cancelled")  # leaving the block closes the connection
        out.add(kind, "ok", start)


async def _grpc(stub: Any, app: str, kind: str, kwargs: dict[str, Any], out: _Outcomes) -> None:
    import grpc
    from segserve.proto.client import generate_request

    start = time.perf_counter()
    md = (("application", app),)
    try:
        request = generate_request(model=MODEL, **kwargs)
        if kind == "grpc-stream":
            async for _ in stub.GenerateStream(request, metadata=md, timeout=120):
                pass
        else:
            await stub.Generate(request, metadata=md, timeout=120)
    except grpc.aio.AioRpcError as e:
        if kind == "grpc-bad" and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return out.add(kind, "refused")
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return out.add(kind, "429")
        return out.add(kind, "unexpected", why=f"{e.code()} {e.details()}")
    except ValueError as e:  # the client refused it before sending: fine for a bad one
        return out.add(kind, "refused" if kind == "grpc-bad" else "unexpected", why=str(e))
    out.add(kind, "unexpected" if kind == "grpc-bad" else "ok", start, why="accepted")


def _pick(rng: random.Random, prefix: list[int]) -> tuple[str, str, dict[str, Any]]:
    """(transport, kind, request) of one random request."""
    ids = [rng.randrange(1, 500) for _ in range(rng.randrange(4, 40))]
    n_tok = rng.randrange(2, 24)
    choices = [
        ("http", "stream", {"prompt": ids, "max_tokens": n_tok, "stream": True}),
        ("http", "prefix", {"prompt": prefix + ids[:4], "max_tokens": n_tok, "stream": True,
                            "cache_salt": rng.choice([None, "tenant-a", "tenant-b"])}),
        ("http", "n>1", {"prompt": ids, "max_tokens": n_tok, "n": 3, "temperature": 0.8}),
        ("http", "beam", {"prompt": ids, "max_tokens": min(n_tok, 8), "beam_width": 3}),
        ("http", "chat", {"messages": [{"role": "user", "content": "hi " * len(ids)}],
                          "max_tokens": n_tok}),
        ("http", "cancel", {"prompt": ids, "max_tokens": 200, "ignore_eos": True,
                            "stream": True}),
        ("http", "bad", rng.choice([{"prompt": ids, "max_tokens": -1},
                                    {"prompt": ids, "temperature": "hot"},
                                    {"prompt": [10**9]}, {"prompt": ids, "n": 0},
                                    {"prompt": ids, "max_tokens": 100000}])),
        ("grpc", "grpc-unary", {"prompt_token_ids": ids, "max_tokens": n_tok}),
        ("grpc", "grpc-stream", {"prompt_token_ids": ids, "max_tokens": n_tok, "n": 2,
                                 "temperature": 0.7}),
        ("grpc", "grpc-bad", rng.choice([{"prompt_token_ids": [], "max_tokens": 2},
                                         {"prompt_token_ids": ids, "top_p": 5.0}])),
    ]  # fmt: skip
    return rng.choice(choices)


async def run_soak(
    base: str, grpc_target: str, app: str, duration_s: float, concurrency: int = 8,
    seed: int = 0, stats: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the mixed workload for ``duration_s`` against a running service; ``stats`` (the
    replica's engine stats) gives leaked blocks once it is idle."""
    import aiohttp
    import grpc
    from segserve.proto import segserve_pb2_grpc

    out = _Outcomes()
    prefix = list(range(100, 164))  # four full 16-token blocks every "prefix" request shares
    end = time.monotonic() + duration_s
    timeout = aiohttp.ClientTimeout(total=180)

    async with (aiohttp.ClientSession(timeout=timeout) as session,
                grpc.aio.insecure_channel(grpc_target) as channel):  # fmt: skip
        stub = segserve_pb2_grpc.SegServeStub(channel)

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                transport, kind, req = _pick(rng, prefix)
                try:
                    if transport == "http":
                        await _http(session, base, kind, req, out)
                    else:
                        await _grpc(stub, app, kind, req, out)
                except Exception as e:  # a transport failure is an outcome, not a crash
                    out.add(kind, "unexpected", why=repr(e))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))

    leaked = None
    if stats is not None:
        deadline = time.monotonic() + 60
        while True:
            s = await asyncio.to_thread(stats)  # a blocking Serve call
            if s.get("running_requests", 0) == 0 and s.get("waiting_requests", 0) == 0:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        leaked = int(s["blocks_used"])
    lat = sorted(out.latency)
    return {
        "duration_s": duration_s,
        "requests": sum(out.counts.values()),
        "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(out.counts.items())},
        "unexpected": out.unexpected[:20],
        "num_unexpected": len(out.unexpected),
        "leaked_blocks": leaked,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    from segserve.deploy.launch import DEFAULT_SERVE_MODE, SERVE_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--rss-every", type=float, default=30.0,
                   help="seconds between RSS samples of every Serve process")
    p.add_argument("--serve-mode", default=DEFAULT_SERVE_MODE, choices=list(SERVE_MODES),
                   help="how Serve takes requests in (deploy.launch.SERVE_MODES); direct and "
                        "throughput: straight to the ingress replica's ports")  # fmt: skip
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds of the same load before the RSS baseline (first requests "
                        "compile and allocate; Serve's proxy grows for its first minutes)")
    p.add_argument("--engine-process", action="store_true",
                   help="the replica's engine steps in a child process (the pool's "
                        "engine_process, the GPU default; CPU pools step in-process)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from segserve.deploy.app import build_app
    from segserve.deploy.launch import (
        GRPC_SERVICER,
        REPLICA_PORT_MODES,
        set_serve_mode,
        wait_for_replica_ports,
    )
    from segserve.deploy.router import deployment_name

    set_serve_mode(args.serve_mode)  # before Ray starts: every Ray process reads it once

    config = {
        "models": [{"name": MODEL, "path": "demo", "dtype": "float32", "max_model_len": 512}],
        "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 256,
                   "max_num_seqs": 8, "max_queue_len": 16, "cpus_per_replica": 1,
                   "engine_process": args.engine_process}],
    }  # fmt: skip
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port,
                                             grpc_servicer_functions=[GRPC_SERVICER]))  # fmt: skip
        serve.run(build_app(config), name="segserve", route_prefix="/")
        replica = serve.get_deployment_handle(deployment_name(MODEL, "cpu"), app_name="segserve")
        base, target = f"http://127.0.0.1:{args.http_port}", f"127.0.0.1:{args.grpc_port}"
        if args.serve_mode in REPLICA_PORT_MODES:
            ports = wait_for_replica_ports("segserve")
            # The replica's servers listen on the HTTP options' host (loopback here).
            base = f"http://127.0.0.1:{ports['HTTP'][1]}"
            target = f"127.0.0.1:{ports['gRPC'][1]}"
        # Warm up (first requests compile and allocate), then take the baseline RSS.
        asyncio.run(run_soak(base, target, "segserve", args.warmup, args.concurrency,
                             args.seed + 1))
        with RssSampler(serve_processes(), args.rss_every) as rss:
            report = asyncio.run(run_soak(base, target, "segserve", args.duration,
                                          args.concurrency, args.seed,
                                          lambda: replica.stats.remote().result()))  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    report["serve_mode"] = args.serve_mode
    report["engine_process"] = args.engine_process
    report["warmup_s"] = args.warmup
    report["load_avg"] = os.getloadavg()
    report["rss_mib"] = rss.report()
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    print(format_rss(report["rss_mib"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["num_unexpected"] or report["leaked_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())

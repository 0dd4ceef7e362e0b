#!/usr/bin/env python
"""Serving benchmark: the engine alone, then the same engine behind Ray Serve over HTTP (OpenAI
SSE) and gRPC, driven by one request schedule, side by side, in one run.

    python bench/serve.py
    python bench/serve.py --input-len 128 --output-len 64 --rates 2,4,8 --json serve.json

The design target it checks: Serve adds <= 5 ms to TTFT and <= 3% to TPOT over the engine alone.

Before Serve starts, the engine alone also measures the **grammar bitmask's step cost**
(``--grammar-batch``, default 16): the decode step time with every request unconstrained, then
with half of them under a JSON schema (xgrammar: the matchers fill a token bitmask on the host,
applied to those rows on the device). Target: <= 5% over unconstrained.

The paths:

* **engine alone**: ``AsyncEngine`` in this process, built by ``deploy.config.engine_config``
  from the same ServiceConfig the service gets, with as many torch threads as Ray gives the
  replica (``OMP_NUM_THREADS``, else the floor of ``cpus_per_replica``). It runs while Ray is
  down, so no Ray process competes with it for the CPU.
* **HTTP**: streaming ``POST /v1/completions`` through Serve's HTTP proxy, with aiohttp (a
  dependency of ray[serve], so always there; httpx need not be). Each network read is
  timestamped on arrival, then split into SSE events.
* **gRPC**: streaming ``GenerateStream`` through Serve's gRPC proxy (``grpc.aio``).
* **HTTP / gRPC, engine in ingress**: the same two, against a second application of the same
  service with ``ingress.engine_in_ingress`` (one deployment: the engine runs in the ingress
  replica, no replica hop). ``--layouts`` picks the layouts (default: both), measured one
  after another (each holds an engine: a one-GPU machine has room for one).
* **Serve modes** (``--serve-modes``, default ``proxy``): each mode named runs every layout in
  a fresh local cluster started with that mode's environment (``deploy.launch.SERVE_MODES``).
  ``proxy`` (the service's default) and ``serve-defaults`` go through Serve's proxy actor, the
  first with Serve's throughput settings (handles over gRPC, our code on the replicas' main
  loops), the second with Serve's own defaults.
  ``direct`` and ``throughput`` (Serve 2.60's direct ingress; the second adds
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED``) have no proxy in the way: the clients call the ingress
  replica's own HTTP and gRPC ports. ``haproxy``: the proxy's ports, served by HAProxy in
  front of those. A path measured in a mode is labelled with it.
* **Engine hosts** (``--engine-hosts``, default: the pool's default): ``process`` steps the
  replica's engine in a child process (``actors/engine_process.py``), ``thread`` in a thread
  of the replica's own process. Each one named runs every layout in turn, labelled ``+host``.

``--serve-floor`` adds **Serve's own floor** in each mode: a no-op ingress and a no-op hop behind
it (``bench/serve_floor.py``), through the same addresses, so the report shows how much of
the overhead is Serve's before any segserve code runs.

The schedule: (a) concurrency 1, ``--num-sequential`` requests one after another; (b) for each
of ``--rates``, ``--num-requests`` Poisson arrivals. Arrival times and prompts come from
``--seed``, so every path sees the same ones. Prompts are random token ids (a list of ids over
HTTP, ``prompt_token_ids`` over gRPC: no tokenizer in the way), decoding is greedy with
``ignore_eos``, so every request makes exactly ``--output-len`` tokens. Each path warms up first
(discarded). Unless ``--no-engine-again``, the engine alone runs once more (a fresh engine)
after Serve has shut down: how far it moves from the first run is the machine's noise floor
(on a small shared VM it can exceed the 3% target by itself).

Metrics, all taken at the client: TTFT (send -> first token), TPOT per request ((last token -
first token) / (tokens - 1)), ITL (every gap between token chunks), at p50 and p99; requests/s
and output tokens/s over the phase (first send -> last token). The verdicts compare medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segserve.actors.benchmark import kv_blocks_needed, percentile

LABELS = {"engine": "engine alone", "http": "Serve HTTP", "grpc": "Serve gRPC",
          "http_one": "HTTP 1-depl.", "grpc_one": "gRPC 1-depl.",
          "engine_again": "engine again"}  # fmt: skip
# First prompt token offset per path (see prompt_for). The rerun gets a fresh engine, so it can
# use the engine's prompts; each Serve mode gets a fresh cluster, so its paths reuse the salts.
SALT = {"engine": 0, "http": 1, "grpc": 2, "http_one": 3, "grpc_one": 4, "engine_again": 0}
APP_NAME = "segserve"
FLOORS: dict[str, dict[str, float]] = {}  # --serve-floor: per mode, serve_floor.measure's
# layout -> (application name, route prefix, its paths)
LAYOUTS = {"split": (APP_NAME, "", ("http", "grpc")),
           "engine-in-ingress": ("one", "/one", ("http_one", "grpc_one"))}  # fmt: skip
# --engine-hosts: where a replica's engine steps (PoolConfig.engine_process). A path measured
# with one named is "<path>@<mode>+<host>" ("<path>@+<host>" in proxy mode).
ENGINE_HOSTS = {"process": True, "thread": False}
# --serve-modes: how Ray Serve takes requests in (deploy.launch.SERVE_MODES). A path measured in
# a mode other than "proxy" is named "<path>@<mode>".
TTFT_TARGET_MS = 5.0
TPOT_TARGET_RATIO = 1.03


def _list_of(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__},"
                                             f" got {text!r}") from None  # fmt: skip
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values

    return parse


def _engine_hosts(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ENGINE_HOSTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"engine hosts are {', '.join(ENGINE_HOSTS)}; "
                                         f"got {text!r}")  # fmt: skip
    return names


def _layouts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in LAYOUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"layouts are {', '.join(LAYOUTS)}; got {text!r}")
    return names


def _serve_modes(text: str) -> list[str]:
    from segserve.deploy.launch import SERVE_MODES

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in SERVE_MODES for n in names):
        raise argparse.ArgumentTypeError(f"serve modes are {', '.join(SERVE_MODES)}; "
                                         f"got {text!r}")  # fmt: skip
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="HF checkpoint directory, or 'demo'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "xpu"])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-sequential", type=int, default=8,
                   help="requests of the concurrency-1 phase")
    p.add_argument("--rates", type=_list_of(float), default=[2.0, 4.0],
                   help="Poisson request rates (req/s), comma-separated")
    p.add_argument("--num-requests", type=int, default=16, help="requests per rate")
    p.add_argument("--warmup", type=int, default=4,
                   help="warm-up requests per path: this many one by one, then as many at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-queue-len", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="the pool's cpus_per_replica (Ray derives the replica's torch threads "
                        "from it; the engine alone gets as many)")
    p.add_argument("--ray-cpus", type=int, default=4,
                   help="logical CPUs of the local Ray cluster (the ingress and the replica "
                        "reserve 1 each)")
    p.add_argument("--http-port", type=int, default=18080)
    p.add_argument("--grpc-port", type=int, default=19090)
    p.add_argument("--layouts", type=_layouts, default=list(LAYOUTS),
                   help="service layouts to measure, comma-separated: split (the engine in "
                        "its own deployment) and/or engine-in-ingress (default: both)")
    p.add_argument("--serve-modes", type=_serve_modes, default=["proxy"],
                   help="how Serve takes requests in, comma-separated, each in a fresh cluster: "
                        "proxy (Serve's proxy actor, with Serve's throughput settings), "
                        "serve-defaults (the same proxy with Serve's own defaults), direct "
                        "(the ingress replica serves HTTP and gRPC itself), throughput "
                        "(direct, with RAY_SERVE_THROUGHPUT_OPTIMIZED), "
                        "haproxy (direct ingress behind HAProxy on the proxy's ports); "
                        "default: proxy")  # fmt: skip
    p.add_argument("--engine-hosts", type=_engine_hosts, default=[None],
                   help="where the replica's engine steps, comma-separated, each measured in "
                        "turn per layout: process (a child process of the replica) and/or "
                        "thread (a thread of the replica's own process); default: the pool's "
                        "default (process on cuda/xpu, thread on cpu)")
    p.add_argument("--paired", action="store_true",
                   help="run an engine alone beside the service (its own process, same GPU) "
                        "and send it each one-by-one request's prompt right after the service "
                        "answers: TTFT/TPOT differences of pairs, immune to the engine's own "
                        "drift between runs")
    p.add_argument("--serve-floor", action="store_true",
                   help="in each mode, also time a no-op ingress and a no-op hop behind it "
                        "(bench/serve_floor.py): Serve's own share of the overhead")
    p.add_argument("--no-engine-again", dest="engine_again", action="store_false",
                   help="skip the engine-alone rerun after Serve (the noise floor)")
    p.add_argument("--ray-logs", action="store_true",
                   help="forward the Serve processes' logs to this terminal")
    p.add_argument("--grammar-batch", type=int, default=16,
                   help="batch of the grammar bitmask measurement (0: skip it)")
    p.add_argument("--grammar-steps", type=int, default=64,
                   help="decode steps measured per run of the grammar measurement")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write every number (summaries and per-request samples) here")
    args = p.parse_args(argv)
    if args.input_len < 2:
        p.error("--input-len must be >= 2 (one token tells the paths' prompts apart)")
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (TPOT needs two tokens)")
    if min(args.num_sequential, args.num_requests) < 1 or args.warmup < 0:
        p.error("--num-sequential and --num-requests must be >= 1, --warmup >= 0")
    return args


# ----- the schedule ----------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    prompts: list[list[int]]  # the paths' shared prompt bodies (see prompt_for)
    arrivals_s: list[float] | None  # offsets from the phase start; None: one after another
    rate: float | None = None


def make_phases(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[Phase]]:
    """(warm-up prompts, measured phases). Every phase has fresh prompts, so no measured prefill
    is served from the prefix cache."""
    rng = random.Random(args.seed)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(n)]

    warm = prompts(2 * args.warmup)
    phases = [Phase("c=1", prompts(args.num_sequential), None)]
    for rate in args.rates:
        t, arrivals = 0.0, []
        for _ in range(args.num_requests):
            arrivals.append(t)
            t += rng.expovariate(rate)
        phases.append(Phase(f"{rate:g} req/s", prompts(args.num_requests), arrivals, rate))
    return warm, phases


def label(path: str, short: bool = False) -> str:
    """"http_one@direct" -> "HTTP 1-depl. direct"."""
    base, _, mode = path.partition("@")
    text = (SHORT if short else LABELS)[base]
    return f"{text} {mode}" if mode else text


def prompt_for(path: str, body: list[int], vocab: int) -> list[int]:
    """The HTTP and gRPC runs share one replica and its prefix cache: with identical prompts the
    second path's prefills would mostly be cache hits. A path-specific first token changes every
    block hash (they are chained) and nothing else: same length, same work."""
    return [(body[0] + SALT[path.split("@")[0]]) % vocab, *body[1:]]


# ----- measurement -----------------------------------------------------------------------------
@dataclass
class Sample:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks with tokens
    tokens: int = 0
    finished: float = 0.0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def tpot(self) -> float:
        return (self.chunk_times[-1] - self.chunk_times[0]) / max(1, self.tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


Send = Callable[[list[int]], Awaitable[Sample]]


@dataclass
class PhaseResult:
    samples: list[Sample]
    duration_s: float  # first send -> last token
    # --paired: the engine twin's answer to the same prompt, sent right after each sample's
    twins: list[Sample] | None = None

    def summary(self, output_len: int) -> dict[str, float]:
        ttft = [s.ttft for s in self.samples]
        tpot = [s.tpot for s in self.samples]
        itl = [g for s in self.samples for g in s.itls]
        tokens = sum(s.tokens for s in self.samples)
        paired = {}
        if self.twins:
            # Differences of pairs taken a moment apart: the drift of the engine's own speed
            # (tens of ms on a shared host) cancels out.
            paired = {
                "twin_ttft_p50_ms": statistics.median(t.ttft for t in self.twins) * 1e3,
                "twin_tpot_p50_ms": statistics.median(t.tpot for t in self.twins) * 1e3,
                "paired_ttft_added_ms": statistics.median(
                    s.ttft - t.ttft for s, t in zip(self.samples, self.twins, strict=True)) * 1e3,
                "paired_tpot_ratio": statistics.median(
                    s.tpot / t.tpot for s, t in zip(self.samples, self.twins, strict=True)),
            }  # fmt: skip
        return {**paired,
            "requests": len(self.samples),
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99.0) * 1e3,
            "tpot_p50_ms": statistics.median(tpot) * 1e3,
            "tpot_p99_ms": percentile(tpot, 99.0) * 1e3,
            "itl_p50_ms": statistics.median(itl) * 1e3 if itl else math.nan,
            "itl_p99_ms": percentile(itl, 99.0) * 1e3,
            "requests_per_s": len(self.samples) / self.duration_s,
            "output_tokens_per_s": tokens / self.duration_s,
            "output_tokens": tokens,
            "short_requests": sum(s.tokens != output_len for s in self.samples),
            "duration_s": self.duration_s,
        }

    def raw(self) -> dict[str, Any]:
        t0 = min(s.sent for s in self.samples)
        return {
            "requests": [{"sent_s": s.sent - t0, "ttft_s": s.ttft, "tpot_s": s.tpot,
                          "tokens": s.tokens, "chunks": len(s.chunk_times),
                          "e2e_s": s.finished - s.sent} for s in self.samples],
            "itl_s": [g for s in self.samples for g in s.itls],
            **({"twins": [{"ttft_s": t.ttft, "tpot_s": t.tpot} for t in self.twins]}
               if self.twins else {}),
        }  # fmt: skip


@dataclass
class Twin:
    """--paired: an engine alone beside the service, asked the same prompt (salted apart, so its
    prefix cache never serves it) right after each of a one-by-one phase's requests."""

    send: Send
    salt: int

    def prompt(self, prompt: list[int], vocab: int) -> list[int]:
        return [(prompt[0] + self.salt) % vocab, *prompt[1:]]


async def run_phase(send: Send, phase: Phase, path: str, vocab: int,
                    twin: Twin | None = None) -> PhaseResult:  # fmt: skip
    prompts = [prompt_for(path, p, vocab) for p in phase.prompts]
    gc.collect()  # a collection of the previous phase's garbage would land in this one's p99
    twins = None
    if phase.arrivals_s is None:
        samples, twins = [], [] if twin is not None else None
        for p in prompts:
            samples.append(await send(p))
            if twin is not None:
                twins.append(await twin.send(twin.prompt(p, vocab)))
    else:
        tasks = []
        t0 = time.perf_counter()
        for prompt, at in zip(prompts, phase.arrivals_s, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(prompt)))
        samples = list(await asyncio.gather(*tasks))
    bad = [s for s in samples if not s.chunk_times]
    if bad:
        raise RuntimeError(f"{path}, {phase.name}: {len(bad)} request(s) returned no tokens")
    if twins:  # the twin's turns between the requests are not the path's time
        return PhaseResult(samples, sum(s.chunk_times[-1] - s.sent for s in samples), twins)
    start = min(s.sent for s in samples)
    end = max(s.chunk_times[-1] for s in samples)
    return PhaseResult(samples, end - start)


async def warm_up(send: Send, prompts: list[list[int]]) -> None:
    """One by one, then all at once: the batched decode shapes get their first run here too."""
    half = len(prompts) // 2
    for p in prompts[:half]:
        await send(p)
    await asyncio.gather(*(send(p) for p in prompts[half:]))


async def run_path(path: str, send: Send, warm: list[list[int]], phases: list[Phase],
                   vocab: int, output_len: int, twin: Twin | None = None,
                   ) -> dict[str, PhaseResult]:  # fmt: skip
    await warm_up(send, [prompt_for(path, p, vocab) for p in warm])
    out = {}
    for phase in phases:
        out[phase.name] = result = await run_phase(send, phase, path, vocab, twin)
        s = result.summary(output_len)
        paired = (f" (its engine twin {s['twin_ttft_p50_ms']:.2f} ms, paired "
                  f"{s['paired_ttft_added_ms']:+.2f} ms)" if "twin_ttft_p50_ms" in s else "")
        print(f"  {label(path):<24} {phase.name:<10} TTFT p50 {s['ttft_p50_ms']:7.2f} ms"
              f"{paired}, TPOT p50 {s['tpot_p50_ms']:6.2f} ms, "
              f"{s['output_tokens_per_s']:7.1f} tok/s", flush=True)  # fmt: skip
    return out


# ----- the three paths -------------------------------------------------------------------------
def engine_sender(engine: Any, output_len: int) -> Send:
    from segserve.actors.sampling_params import SamplingParams

    # What the ingress builds from the HTTP body / gRPC SamplingOptions below.
    sampling = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}

    async def send(prompt: list[int]) -> Sample:
        s = Sample(time.perf_counter())
        async for d in engine.generate(prompt, SamplingParams(**sampling)):
            if d.token_ids:
                s.chunk_times.append(time.perf_counter())
                s.tokens += len(d.token_ids)
        s.finished = time.perf_counter()
        return s

    return send


def http_sender(session: Any, url: str, model: str, output_len: int) -> Send:
    base = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Content-Type": "application/json"}

    async def send(prompt: list[int]) -> Sample:
        body = json.dumps({**base, "prompt": prompt}).encode()
        s = Sample(time.perf_counter())
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            buf = b""
            # iter_any yields each network read as it arrives: events that came in one read
            # share its timestamp, which is when the client could have seen them.
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                *events, buf = (buf + data).split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    obj = json.loads(event[6:])
                    if "error" in obj:
                        raise RuntimeError(f"stream error: {obj['error']}")
                    if obj.get("choices"):
                        s.chunk_times.append(now)
                    if obj.get("usage"):
                        s.tokens = obj["usage"]["completion_tokens"]
        s.finished = time.perf_counter()
        return s

    return send


def grpc_sender(stub: Any, model: str, output_len: int, app: str = APP_NAME) -> Send:
    from segserve.proto.client import generate_request

    metadata = (("application", app),)

    async def send(prompt: list[int]) -> Sample:
        request = generate_request(prompt_token_ids=prompt, model=model, max_tokens=output_len,
                                   temperature=0.0, ignore_eos=True)  # fmt: skip
        s = Sample(time.perf_counter())
        async for resp in stub.GenerateStream(request, metadata=metadata):
            n = sum(len(c.token_ids) for c in resp.choices)
            if n:
                s.chunk_times.append(time.perf_counter())
                s.tokens += n
        s.finished = time.perf_counter()
        return s

    return send


def service_config(args: argparse.Namespace, engine_in_ingress: bool = False,
                   host: str | None = None) -> dict[str, Any]:  # fmt: skip
    """``host``: where the replica's engine steps (ENGINE_HOSTS); None: the pool's default."""
    slots = args.max_num_seqs + 2 * args.warmup
    return {
        "models": [{"name": "demo", "path": args.model, "dtype": args.dtype}],
        "pools": [{
            "name": args.device, "device": args.device, "num_replicas": 1,
            # Every sequence the engine may run at once fits at full length: no preemption.
            "num_kv_blocks": kv_blocks_needed(slots, args.input_len, args.output_len,
                                              args.block_size),
            "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
            "max_queue_len": args.max_queue_len, "cpus_per_replica": args.cpus_per_replica,
            "engine_process": None if host is None else ENGINE_HOSTS[host],
        }],
        "ingress": {"engine_in_ingress": engine_in_ingress},
    }  # fmt: skip


def replica_threads(cpus_per_replica: float) -> int:
    """torch's thread count in a replica: Ray sets OMP_NUM_THREADS in each worker, unless the
    driver's environment already does, to the floor of the actor's num_cpus (at least 1)."""
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env else max(1, math.floor(cpus_per_replica))


def bench_engine(args: argparse.Namespace, core: Any, warm: list[list[int]],
                 phases: list[Phase], vocab: int, path: str = "engine") -> dict[str, PhaseResult]:
    from segserve.actors.async_engine import AsyncEngine

    async def main() -> dict[str, PhaseResult]:
        engine = AsyncEngine(core.config, core=core)
        return await run_path(path, engine_sender(engine, args.output_len), warm, phases, vocab,
                              args.output_len)  # fmt: skip

    return asyncio.run(main())


# An array of objects that cannot end within the run (minItems), so a constrained row stays
# under its grammar for every measured step.
GRAMMAR_SCHEMA = {"type": "array", "minItems": 64, "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "size": {"enum": ["S", "M", "L"]}, "n": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "size", "n"]}}


def bench_grammar(args: argparse.Namespace, core: Any, vocab: int) -> dict[str, float]:
    """Median decode step time at ``--grammar-batch`` rows, unconstrained vs half the rows
    under GRAMMAR_SCHEMA (compiled before the clock starts), all greedy with ignore_eos, runs
    interleaved so the machine's drift hits both alike. A row whose JSON ends (EOS ignored)
    runs on unconstrained: ``still_constrained`` counts the rows under their grammar at the end
    of the measured window. ``grammar_ms_per_step``: the time spent in the grammar's own code
    (bitmask fill and apply, matchers accepting tokens), per step: the cost without the noise."""
    from segserve import SamplingParams
    from segserve.actors import (
        structured,
        token_updates,  # it calls structured.accept per token
    )

    batch, steps = args.grammar_batch, args.grammar_steps
    rng = random.Random(args.seed + 99)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(batch)]
    n = steps + 8
    plain = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)
    schema = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0,
                            structured={"json": GRAMMAR_SCHEMA})
    core.grammars.compile(schema.structured)
    still, in_grammar = [], [0.0]

    def timed(fn: Callable) -> Callable:
        def wrapper(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                in_grammar[0] += time.perf_counter() - t
        return wrapper

    real_apply, real_accept = structured.grammar_bitmask, token_updates.accept
    structured.grammar_bitmask = timed(real_apply)
    token_updates.accept = timed(real_accept)

    def step_times(constrained: int) -> list[float]:
        for i, p in enumerate(prompts):
            core.add_request(p, schema if i < constrained else plain)
        times = []
        while core.has_work():
            t = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t)
            if len(times) == 4 + steps and constrained:
                still.append(sum(1 for g in core.groups.values() for s in g.seqs
                                 if s.matcher is not None and not s.matcher.is_terminated()))
        # decode steps only: past the prefill, before the batch starts to drain
        return times[4 : 4 + steps]

    try:
        step_times(batch // 2)  # warm-up (and the decode buffers' first use)
        in_grammar[0] = 0.0
        base, half = [], []
        for _ in range(5):
            base += step_times(0)
            half += step_times(batch // 2)
    finally:
        structured.grammar_bitmask, token_updates.accept = real_apply, real_accept
    b, h = statistics.median(base), statistics.median(half)
    # in_grammar covers every step of the constrained runs (prefill and drain too)
    per_step = in_grammar[0] / (5 * (n + 1))
    return {"batch": batch, "constrained": batch // 2, "still_constrained": min(still),
            "unconstrained_step_ms": 1e3 * b, "half_constrained_step_ms": 1e3 * h,
            "overhead_pct": 100 * (h / b - 1), "grammar_ms_per_step": 1e3 * per_step,
            "grammar_pct": 100 * per_step / b}


def format_grammar(g: dict[str, float]) -> str:
    verdict = "ok" if g["overhead_pct"] <= 5.0 else "OVER"
    return (f"grammar bitmask, batch {g['batch']} ({g['constrained']} under a JSON schema, "
            f"{g['still_constrained']} still at the end): "
            f"step {g['half_constrained_step_ms']:.2f} ms vs {g['unconstrained_step_ms']:.2f} ms "
            f"unconstrained, {g['overhead_pct']:+.1f}% (target <= 5%: {verdict}); of which "
            f"the grammar's own code {g['grammar_ms_per_step']:.2f} ms/step "
            f"({g['grammar_pct']:.1f}%)")


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            msg = f"port {port} is in use; pick another with --http-port/--grpc-port"
            raise SystemExit(msg) from None


async def _wait_ready(session: Any, base: str, stub: Any, app: str,
                      timeout_s: float = 60.0) -> None:  # fmt: skip
    """serve.run returns once the replicas run; the proxies learn the route a moment later."""
    from segserve.proto import segserve_pb2

    deadline = time.monotonic() + timeout_s
    metadata = (("application", app),)
    while True:
        problem = "not ready"
        try:
            async with session.get(f"{base}/health") as resp:
                http_ok = resp.status == 200
            health = await stub.Health(segserve_pb2.HealthRequest(), timeout=5, metadata=metadata)
            if http_ok and health.status == "ok":
                return
        except Exception as e:  # connection refused / UNAVAILABLE until the proxies are up
            problem = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not become ready in {timeout_s:.0f} s: {problem}")
        await asyncio.sleep(0.25)


def bench_serve(args: argparse.Namespace, warm: list[list[int]], phases: list[Phase],
                vocab: int, mode: str = "proxy", twin_config: Any = None,
                ) -> dict[str, dict[str, PhaseResult]]:  # fmt: skip
    """Every layout's HTTP and gRPC paths through a fresh local cluster in Serve ``mode``
    (its variables set before Ray starts; in a direct mode the clients call the ingress
    replica's own ports instead of the proxy's). ``twin_config``: the engine of --paired's
    twin (an EngineProcess of this process, beside the service's)."""
    # A throwaway cluster that lives for this run only and is reached from this machine: token
    # auth (Ray 2.60's default for new clusters) would only add a ~/.ray/auth_token to manage.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from segserve.deploy.launch import (
        GRPC_SERVICER,
        REPLICA_PORT_MODES,
        set_serve_mode,
        wait_for_replica_ports,
    )

    set_serve_mode(mode)
    import aiohttp
    import grpc
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from segserve.deploy.app import build_app
    from segserve.proto import segserve_pb2_grpc

    _check_port_free(args.http_port)
    _check_port_free(args.grpc_port)
    cleanup: list[Callable[[], None]] = []
    keep = ("PYTHONPATH", "SEGSERVE_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    t = time.perf_counter()
    # address="local": always a fresh cluster of our own, never one somebody else started.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
             log_to_driver=args.ray_logs,
             runtime_env={"env_vars": {k: os.environ[k] for k in keep if k in os.environ}})
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
            grpc_options=gRPCOptions(port=args.grpc_port,
                                     grpc_servicer_functions=[GRPC_SERVICER]),
        )  # fmt: skip

        def addresses(app: str, prefix: str) -> tuple[str, str]:
            if mode not in REPLICA_PORT_MODES:  # the proxy's (or HAProxy's) ports
                return f"http://127.0.0.1:{args.http_port}{prefix}", f"127.0.0.1:{args.grpc_port}"
            # The replica's servers bind the HTTP options' host (loopback here), while the
            # target names the node's address; paths keep the application's route prefix.
            targets = wait_for_replica_ports(app)
            return (f"http://127.0.0.1:{targets['HTTP'][1]}{prefix}",
                    f"127.0.0.1:{targets['gRPC'][1]}")  # fmt: skip

        async def measure(layout: str, host: str | None) -> dict[str, PhaseResult]:
            app, prefix, (http, grpc_path) = LAYOUTS[layout]
            # limit=0: no client-side cap on connections, so a burst is never queued here.
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
            suffix = ("" if mode == "proxy" else mode) + ("" if host is None else f"+{host}")
            suffix = suffix and f"@{suffix}"
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                base, target = addresses(app, prefix)
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = segserve_pb2_grpc.SegServeStub(channel)
                    await _wait_ready(session, base, stub, app)
                    senders = {http + suffix: http_sender(session, f"{base}/v1/completions",
                                                          "demo", args.output_len),
                               grpc_path + suffix: grpc_sender(stub, "demo", args.output_len,
                                                               app)}  # fmt: skip
                    return {path: await run_path(path, send, warm, phases, vocab,
                                                 args.output_len, twin and twin())
                            for path, send in senders.items()}  # fmt: skip

        twin = None
        if twin_config is not None:
            twin = make_twin(twin_config, args, warm, vocab)
            cleanup.append(twin.engine.shutdown)
        results: dict[str, dict[str, PhaseResult]] = {}
        if args.serve_floor:
            import serve_floor

            serve_floor.deploy()

            async def floor() -> dict[str, float]:
                http_base, grpc_target = addresses(serve_floor.APP, serve_floor.PREFIX)
                async with aiohttp.ClientSession() as session:
                    out = await serve_floor.measure(session, http_base)
                return {**out, **await serve_floor.measure_grpc(grpc_target)}

            FLOORS[mode] = asyncio.run(floor())
            print(f"Serve's floor ({mode}): " + ", ".join(
                f"{k} {v:.2f}" for k, v in FLOORS[mode].items()), flush=True)
            serve.delete(serve_floor.APP)
        for layout, host in itertools.product(args.layouts, args.engine_hosts):
            # One layout at a time: each holds an engine, and on a one-GPU machine a second
            # engine's replica would wait for the GPU forever (serve.run never returning).
            app, prefix, _ = LAYOUTS[layout]
            config = service_config(args, layout == "engine-in-ingress", host)
            serve.run(build_app(config), name=app, route_prefix=prefix or "/")
            print(f"Serve ({mode}, {layout}, engine in a {host or 'default'} host) up in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
            results.update(asyncio.run(measure(layout, host)))
            serve.delete(app)
            t = time.perf_counter()
        return results
    finally:
        for stop in cleanup:
            stop()
        serve.shutdown()
        ray.shutdown()


class TwinFactory:
    """--paired: one engine beside the service for the whole run; each path gets its own salt."""

    def __init__(self, engine: Any, send: Send) -> None:
        self.engine, self.send = engine, send
        self._salts = itertools.count(1000, 16)

    def __call__(self) -> Twin:
        return Twin(self.send, next(self._salts))


def make_twin(config: Any, args: argparse.Namespace, warm: list[list[int]],
              vocab: int) -> TwinFactory:  # fmt: skip
    """An EngineProcess: its own process, as the engine alone ran, so the driver's client
    code and Ray threads never share its GIL. Warmed like a path."""
    from segserve.actors.engine_process import EngineProcess

    t = time.perf_counter()
    engine = EngineProcess(config)
    send = engine_sender(engine, args.output_len)

    # Its own prefix-cache keys, apart from every path's
    asyncio.run(warm_up(send, [Twin(send, 999).prompt(p, vocab) for p in warm]))
    print(f"engine twin up and warm in {time.perf_counter() - t:.1f} s", flush=True)
    return TwinFactory(engine, send)


# ----- report ----------------------------------------------------------------------------------
def format_phase(phase: Phase, summaries: dict[str, dict[str, float]], output_len: int) -> str:
    head = (f"{'path':<24} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
            f"{'ITL p50':>8} {'ITL p99':>8} {'req/s':>7} {'tok/s':>8}")
    title = (f"{phase.name}: {len(phase.prompts)} requests"
             + (" one after another" if phase.rate is None else ", Poisson arrivals"))
    lines = [title + " (ms; throughput from first send to last token)", head, "-" * len(head)]
    for path, s in summaries.items():
        note = f"  ({s['short_requests']} not {output_len} tokens!)" if s["short_requests"] else ""
        lines.append(
            f"{label(path):<24} {s['ttft_p50_ms']:>9.2f} {s['ttft_p99_ms']:>9.2f} "
            f"{s['tpot_p50_ms']:>9.3f} {s['tpot_p99_ms']:>9.3f} {s['itl_p50_ms']:>8.3f} "
            f"{s['itl_p99_ms']:>8.3f} {s['requests_per_s']:>7.2f} "
            f"{s['output_tokens_per_s']:>8.1f}{note}"
        )
    return "\n".join(lines)


SHORT = {"http": "HTTP", "grpc": "gRPC", "http_one": "HTTP 1-depl.", "grpc_one": "gRPC 1-depl.",
         "engine_again": "engine again"}  # fmt: skip


def verdicts(phases: list[Phase], summaries: dict[str, dict[str, dict[str, float]]]) -> list[dict]:
    """Each Serve path against the engine alone, per phase: against the better of its two runs
    where it ran again (a first run can pay one-off costs, such as Triton compiling kernels for
    shapes the warm-up missed, that the later processes find cached), so the verdict never
    credits Serve with the engine's bad luck. The rerun is compared with the first run the same
    way but is no verdict: its difference is what noise alone gives."""
    engine_runs = [summaries[p] for p in ("engine", "engine_again") if p in summaries]
    rows = []
    for phase in phases:
        best_ttft = min(run[phase.name]["ttft_p50_ms"] for run in engine_runs)
        best_tpot = min(run[phase.name]["tpot_p50_ms"] for run in engine_runs)
        for path in [p for p in summaries if p != "engine"]:
            s = summaries[path][phase.name]
            if path == "engine_again":  # the noise floor: the rerun against the first run
                first = summaries["engine"][phase.name]
                d_ttft = s["ttft_p50_ms"] - first["ttft_p50_ms"]
                r_tpot = s["tpot_p50_ms"] / first["tpot_p50_ms"]
            else:
                d_ttft = s["ttft_p50_ms"] - best_ttft
                r_tpot = s["tpot_p50_ms"] / best_tpot
            row = {"phase": phase.name, "path": path, "ttft_added_ms": d_ttft,
                   "ttft_pass": d_ttft <= TTFT_TARGET_MS, "tpot_ratio": r_tpot,
                   "tpot_pass": r_tpot <= TPOT_TARGET_RATIO,
                   "noise_floor": path == "engine_again"}  # fmt: skip
            if "paired_ttft_added_ms" in s:  # --paired: against the twin, pair by pair
                row.update(paired_ttft_added_ms=s["paired_ttft_added_ms"],
                           paired_ttft_pass=s["paired_ttft_added_ms"] <= TTFT_TARGET_MS,
                           paired_tpot_ratio=s["paired_tpot_ratio"],
                           paired_tpot_pass=s["paired_tpot_ratio"] <= TPOT_TARGET_RATIO,
                           twin_ttft_p50_ms=s["twin_ttft_p50_ms"])  # fmt: skip
            rows.append(row)
    return rows


def format_verdicts(rows: list[dict]) -> str:
    head = f"{'phase':<10} {'path':<24} {'TTFT +ms':>9} {'':<7} {'TPOT ratio':>10}"
    lines = [f"Serve over the engine alone (medians; the better of the engine's runs); targets: "
             f"TTFT +<= {TTFT_TARGET_MS:g} ms, TPOT <= {TPOT_TARGET_RATIO:.2f}x", head,
             "-" * len(head)]  # fmt: skip

    def verdict(ok: bool, noise: bool) -> str:
        return "(noise)" if noise else "PASS" if ok else "FAIL"

    for r in rows:
        noise = r["noise_floor"]
        lines.append(f"{r['phase']:<10} {label(r['path'], True):<24} {r['ttft_added_ms']:>+9.2f} "
                     f"{verdict(r['ttft_pass'], noise):<7} {r['tpot_ratio']:>9.3f}x "
                     f"{verdict(r['tpot_pass'], noise):<7}".rstrip())  # fmt: skip
    paired = [r for r in rows if "paired_ttft_added_ms" in r]
    if paired:
        head = (f"{'phase':<10} {'path':<24} {'TTFT +ms':>9} {'':<7} {'TPOT ratio':>10} "
                f"{'':<7} {'twin TTFT':>9}")
        lines += ["", "Paired with the engine twin (each request, then the same prompt to an "
                  "engine alone beside the service; medians of the pairs' differences)", head,
                  "-" * len(head)]  # fmt: skip
        for r in paired:
            lines.append(f"{r['phase']:<10} {label(r['path'], True):<24} "
                         f"{r['paired_ttft_added_ms']:>+9.2f} "
                         f"{verdict(r['paired_ttft_pass'], False):<7} "
                         f"{r['paired_tpot_ratio']:>9.3f}x "
                         f"{verdict(r['paired_tpot_pass'], False):<7} "
                         f"{r['twin_ttft_p50_ms']:>9.2f}")  # fmt: skip
    return "\n".join(lines)


def _load() -> str:
    return f", load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only, never the network
    wall = time.perf_counter()
    import torch
    from segserve.deploy.config import ServiceConfig, engine_config

    cfg = ServiceConfig.model_validate(service_config(args))
    model_cfg = cfg.models[0]
    pool = cfg.pools_for(model_cfg)[0]
    econfig = engine_config(model_cfg, pool)
    threads = replica_threads(pool.cpus_per_replica)
    if args.device == "cpu":
        torch.set_num_threads(threads)

    from segserve.actors.engine import EngineCore

    # The engine alone; its reading of the model also gives the vocabulary and context length.
    core = EngineCore(econfig)
    vocab, max_len = core.spec.vocab_size, core.max_model_len
    if args.input_len + args.output_len > max_len:
        raise SystemExit(f"input-len + output-len exceeds the model's max length {max_len}")
    warm, phases = make_phases(args, vocab)

    print(f"model {args.model} {args.dtype} on {args.device} (torch threads {threads}, as in the "
          f"replica), {os.cpu_count()} CPUs{_load()}; input {args.input_len}, output "
          f"{args.output_len} tokens, greedy, ignore_eos; warm-up {2 * args.warmup} requests "
          f"per path", flush=True)  # fmt: skip

    grammar = None
    if args.grammar_batch:
        print("grammar bitmask cost (engine alone) ...", flush=True)
        grammar = bench_grammar(args, core, vocab)
        print(format_grammar(grammar), flush=True)
    print("engine alone ...", flush=True)
    results = {"engine": bench_engine(args, core, warm, phases, vocab)}
    del core  # its KV pool and weights are not needed while Serve runs
    gc.collect()
    for mode in args.serve_modes:
        print(f"Serve {mode} ({', '.join(args.layouts)}: HTTP, then gRPC){_load()} ...",
              flush=True)  # fmt: skip
        results.update(bench_serve(args, warm, phases, vocab, mode,
                                   econfig if args.paired else None))
    paths = list(results)
    if args.engine_again:
        print(f"engine alone again, a fresh engine{_load()} ...", flush=True)
        core = EngineCore(econfig)
        results["engine_again"] = bench_engine(args, core, warm, phases, vocab, "engine_again")
        paths.append("engine_again")
        del core

    summaries = {path: {name: r.summary(args.output_len) for name, r in res.items()}
                 for path, res in results.items()}  # fmt: skip
    print()
    for phase in phases:
        print(format_phase(phase, {p: summaries[p][phase.name] for p in paths},
                           args.output_len))  # fmt: skip
        print()
    rows = verdicts(phases, summaries)
    print(format_verdicts(rows))
    if grammar is not None:
        print(format_grammar(grammar))
    for mode, floor in FLOORS.items():
        print(f"Serve's own floor ({mode}, no segserve code, medians): a no-op request "
              f"{floor['local_ms']:.2f} ms, one with a hop {floor['hop_ms']:.2f} ms "
              f"(the hop {floor['hop_cost_ms']:.2f} ms); over gRPC "
              f"{floor['grpc_local_ms']:.2f} and {floor['grpc_hop_ms']:.2f} ms")  # fmt: skip
    wall = time.perf_counter() - wall
    print(f"\nwall time {wall:.1f} s{_load()}", flush=True)

    if args.json is not None:
        out = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "engine_config": asdict(econfig),
            "torch_threads": threads,
            "phases": [{"name": ph.name, "rate": ph.rate, "arrivals_s": ph.arrivals_s}
                       for ph in phases],
            "summaries": summaries,
            "raw": {path: {name: r.raw() for name, r in res.items()}
                    for path, res in results.items()},
            "verdicts": rows,
            "grammar": grammar,
            "serve_floor": FLOORS,
            "wall_s": wall,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

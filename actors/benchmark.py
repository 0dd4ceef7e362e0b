"""Timing the engine alone: a batch run to completion with every step timed, ``segserve
bench-offline``'s run (``run_offline``), and the helpers the offline benchmarks share
(bench/offline.py, bench/serve.py)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import EngineConfig
from .engine import EngineCore
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class BatchTiming:
    batch_size: int
    input_len: int
    output_len: int
    prefill_s: float  # from submission until every request has its first token
    decode_steps_s: list[float]  # each step in which every sequence only decoded
    total_s: float
    generated_tokens: int

    @property
    def decode_p50_s(self) -> float:
        return statistics.median(self.decode_steps_s) if self.decode_steps_s else float("nan")

    @property
    def decode_p99_s(self) -> float:
        return percentile(self.decode_steps_s, 99.0)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def random_prompts(rng: random.Random, vocab_size: int, batch_size: int,
                   input_len: int) -> list[list[int]]:
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(batch_size)]


def set_cpu_threads(choice: str | int | None, dtype: torch.dtype = torch.float32) -> str:
    """Apply ``--threads`` (a count, "auto", or None for torch's default); returns a note for
    the report. "auto" times a memory-bound matvec at a few thread counts and keeps the fastest:
    on a small shared machine, one other busy process makes torch's all-cores default ~10-100x
    slower (every op waits for a descheduled sibling thread), which would swamp what is measured.
    The matvec is the decode step's: in ``dtype``, through the CPU backend's linear (bf16 weights
    pre-packed for oneDNN, which needs every core to reach memory speed).
    """
    if choice is None:
        return f"threads={torch.get_num_threads()}"
    if choice != "auto":
        if not str(choice).isdigit() or int(choice) < 1:
            raise ValueError(f"threads must be an integer >= 1 or 'auto', got {choice!r}")
        torch.set_num_threads(int(choice))
        return f"threads={choice}"
    from segserve.kernels import get_backend

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # 64 MiB or more: larger than the L3 of the machines we run on, like a model's weights; a
    # matrix that stays in cache measures only thread synchronisation, which favours 1 thread.
    cpu = get_backend("cpu")
    w = torch.randn(4096 * 4 // torch.empty((), dtype=dtype).element_size(), 4096).to(dtype)
    w = cpu.pack_linear_weight(w) if cpu.pack_linear_weight(w[:16]) is not None else w
    x = torch.randn(1, 4096).to(dtype)
    times = {}
    for k in sorted({n or 1, max((n or 1) - 1, 1), 1}, reverse=True):
        torch.set_num_threads(k)
        cpu.linear(x, w)
        samples = []
        for _ in range(10):
            t = time.perf_counter()
            cpu.linear(x, w)
            samples.append(time.perf_counter() - t)
        times[k] = statistics.median(samples)
    best = min(times, key=times.__getitem__)
    torch.set_num_threads(best)
    probe = ", ".join(f"{k}: {t * 1e3:.2f} ms" for k, t in times.items())
    return f"threads={best} (auto; matvec probe {probe})"


def kv_blocks_needed(batch_size: int, input_len: int, output_len: int, block_size: int) -> int:
    """A pool that holds the whole batch at full length (plus one spare block per sequence), so
    the measurement never includes a preemption."""
    return batch_size * (-(-(input_len + output_len) // block_size) + 1)


def measure_batch(core: EngineCore, prompts: list[list[int]], output_len: int) -> BatchTiming:
    """Run ``prompts`` (greedy, ignore_eos, ``output_len`` tokens each) to completion, timing each
    ``EngineCore.step()``. Steps until every request has its first token count as prefill; after
    that every step only decodes and its time is one decode-step sample."""
    device = torch.device(core.config.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "xpu":
            torch.xpu.synchronize(device)

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    groups = [core.make_request(p, params) for p in prompts]
    if core.has_work():
        raise RuntimeError("the engine must be idle before a measurement")
    gc.collect()  # a collection inside the timed loop would land in p99
    started: set[str] = set()
    prefill_s, decode_steps, generated = 0.0, [], 0
    sync()
    t0 = time.perf_counter()
    for g in groups:
        core.submit(g)
    while core.has_work():
        decoding = len(started) == len(groups)
        # No device sync per step: step() returns once its tokens are on the host, and a decode
        # step may leave the next one running on the device (the engine's lookahead), as it
        # does in serving. The time between returns is what a client sees per step.
        ts = time.perf_counter()
        deltas = core.step()
        dt = time.perf_counter() - ts
        for d in deltas:
            if d.finish_reason in ("error", "abort"):
                raise RuntimeError(f"benchmark request {d.request_id} ended with "
                                   f"{d.finish_reason!r}")
            generated += len(d.token_ids)
            if d.token_ids:
                started.add(d.request_id)
        if decoding:
            decode_steps.append(dt)
        else:
            prefill_s += dt
    sync()
    total = time.perf_counter() - t0
    if core.kv.preemptions:
        logger.warning("%d preemptions during the benchmark: the KV pool is too small",
                       core.kv.preemptions)
    return BatchTiming(len(prompts), len(prompts[0]), output_len, prefill_s, decode_steps,
                       total, generated)


def bench_engine(core: EngineCore, batch_sizes: list[int], input_len: int, output_len: int,
                 seed: int = 0, warmup_tokens: int = 8) -> list[BatchTiming]:
    """For each batch size: a short warm-up at that shape, then the measured run. Every run gets
    fresh random prompts, so the prefix cache never serves a measured prefill."""
    rng = random.Random(seed)
    vocab = core.spec.vocab_size
    results = []
    for b in batch_sizes:
        warm = min(output_len, warmup_tokens)
        measure_batch(core, random_prompts(rng, vocab, b, input_len), warm)
        results.append(measure_batch(core, random_prompts(rng, vocab, b, input_len), output_len))
    return results


def format_table(rows: list[BatchTiming]) -> str:
    header = (f"{'batch':>6} {'prefill ms':>11} {'decode ms p50':>14} {'decode ms p99':>14} "
              f"{'tok/s':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.batch_size:>6} {r.prefill_s * 1e3:>11.2f} {r.decode_p50_s * 1e3:>14.3f} "
                     f"{r.decode_p99_s * 1e3:>14.3f} {r.tokens_per_s:>10.1f}")
    return "\n".join(lines)


def run_offline(config: EngineConfig, batch_sizes: list[int], input_len: int, output_len: int,
                seed: int = 0, threads: str | int = "auto",
                out: Callable[[str], None] = print) -> list[BatchTiming]:  # fmt: skip
    """``segserve bench-offline``: load the engine, then ``bench_engine`` at each batch size;
    ``out`` gets the header (after the load) and the table. Unless ``config`` fixes the KV pool,
    it is sized to the workload: allocating (and zeroing) a multi-GiB pool from the memory
    budget would dominate a small benchmark's run time. CPU threads: ``config.cpu_threads``, else
    ``threads`` (see set_cpu_threads); torch's thread count is restored afterwards."""
    from segserve.models import resolve_dtype

    max_b = max(batch_sizes)
    changes: dict = {"max_num_seqs": max_b, "seed": seed}
    if config.num_kv_blocks is None:
        changes["num_kv_blocks"] = kv_blocks_needed(max_b, input_len, output_len,
                                                    config.block_size)  # fmt: skip
    config = dataclasses.replace(config, **changes)
    old_threads = torch.get_num_threads()
    try:
        note = ""
        if config.device == "cpu":
            if config.cpu_threads is None:
                note = ", " + set_cpu_threads(threads, resolve_dtype(config.dtype))
                # The engine applies its own thread count at start: hand it the probe's choice.
                config = dataclasses.replace(config, cpu_threads=torch.get_num_threads())
            else:
                note = f", threads={config.cpu_threads}"
        t = time.perf_counter()
        core = EngineCore(config)
        load_s = time.perf_counter() - t
        need = input_len + output_len
        if need > core.max_model_len:
            raise ValueError(f"input-len + output-len = {need} exceeds the model's max length "
                             f"{core.max_model_len}")  # fmt: skip
        out(f"model {config.model} on {config.device} ({config.dtype}{note}), loaded in "
            f"{load_s:.1f} s; input {input_len} tokens, output {output_len} tokens, block size "
            f"{config.block_size}, KV pool {core.kv.num_blocks} blocks")  # fmt: skip
        rows = bench_engine(core, batch_sizes, input_len, output_len, seed)
        out(format_table(rows))
        return rows
    finally:
        torch.set_num_threads(old_threads)  # the caller may go on in this process (tests)

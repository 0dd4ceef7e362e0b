#!/usr/bin/env python
"""CPU all-reduce latency: torch.distributed's gloo against our oneCCL binding (actors/oneccl).

    python bench/collectives.py [--world-size 2] [--numel 4096] [--dtype bfloat16]

Tensor parallelism all-reduces each layer's activations twice per step, so at batch 1 this
latency, times 2 x layers, is the step time TP adds. The ranks are processes started with
torch.multiprocessing on this machine, one thread each. Each figure is the median over blocks of
back-to-back all-reduces, the two backends taking turns block by block so a neighbour's load hits
both alike. bench/offline.py --tp calls `allreduce_latency` and prints `format_latency`.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from segserve.actors import oneccl

BLOCK = 10  # all-reduces timed together: one alone is too short for the clock and the skew


def allreduce_latency(
    world_size: int = 2, numel: int = 4096, dtype: torch.dtype = torch.bfloat16, iters: int = 500
) -> dict[str, float]:
    """Median microseconds of one in-place sum all-reduce of `numel` elements, per backend:
    {"gloo": ..., "oneccl": ...}. "oneccl" is NaN where the binding can't be built or loaded
    (`segserve.actors.oneccl.unavailable_reason()` says why)."""
    use_oneccl = oneccl.load_binding() is not None  # built here once, not by every rank at once
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(
        _rank,
        args=(world_size, _free_port(), numel, dtype, max(1, iters // BLOCK), use_oneccl, results),
        nprocs=world_size,
        join=True,
    )
    latency = results.get()
    latency.setdefault("oneccl", math.nan)
    return latency


def format_latency(latency: dict[str, float], world_size: int, numel: int,
                   dtype: torch.dtype) -> str:
    size = numel * torch.empty((), dtype=dtype).element_size()
    lines = [f"all-reduce of {numel} x {str(dtype).removeprefix('torch.')} ({size} B), "
             f"{world_size} ranks on this CPU",
             f"{'backend':<8} {'median us':>10}"]
    for backend, us in latency.items():
        if math.isnan(us):
            lines.append(f"{backend:<8} {'n/a':>10}  ({oneccl.unavailable_reason()})")
        else:
            ratio = f"  ({us / latency['gloo']:.2f}x gloo)" if backend != "gloo" else ""
            lines.append(f"{backend:<8} {us:>10.1f}{ratio}")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, numel: int, dtype: torch.dtype, blocks: int,
          use_oneccl: bool, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    backends = {"gloo": dist.all_reduce}
    comm = None
    if use_oneccl:
        address = [oneccl.create_main_kvs(world_size) if rank == 0 else None]
        dist.broadcast_object_list(address, src=0)
        comm = oneccl.OneCCLCommunicator(rank, world_size, address[0], timeout_s=120)
        backends["oneccl"] = comm.all_reduce
    # small values so that bf16 sums stay finite however many times they're added up
    t = torch.randn(numel).mul_(1e-3).to(dtype)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for block in range(blocks + 1):
        for name, all_reduce in backends.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(BLOCK):
                all_reduce(t)
            if block:  # the first block warms up
                times[name].append((time.perf_counter() - start) / BLOCK * 1e6)
    if rank == 0:
        results.put({name: statistics.median(ts) for name, ts in times.items()})
    if comm is not None:
        comm.close()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--numel", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, ...")
    p.add_argument("--iters", type=int, default=500, help="all-reduces per backend")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if hasattr(os, "getloadavg"):
        print(f"load avg {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    latency = allreduce_latency(args.world_size, args.numel, dtype, args.iters)
    print(format_latency(latency, args.world_size, args.numel, dtype))
    if hasattr(os, "getloadavg"):
        print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

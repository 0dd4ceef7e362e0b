"""Threads and core affinity of a CPU engine, picked at start and logged.

Threads: ``EngineConfig.cpu_threads`` when set (a Ray replica passes its pool's
``cpus_per_replica``), else every core this process may run on (offline: all cores, or the
cgroup/cpuset's). Affinity: the process keeps the cores it is allowed (a Kubernetes cpuset, a
``taskset``): replicas that share a node cannot see each other, so narrowing to "the first n
cores" would stack them on the same cores. ``SEGSERVE_CPU_CORES`` (e.g. ``0-3,8``) binds the
process to chosen cores explicitly; threads then default to their count.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

CORES_ENV = "SEGSERVE_CPU_CORES"


def parse_cores(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; a ValueError names a bad list."""
    cores: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"{CORES_ENV} must look like '0-3,8', got {text!r}") from None
    if not cores:
        raise ValueError(f"{CORES_ENV} names no cores: {text!r}")
    return sorted(cores)


def format_cores(cores: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    runs: list[str] = []
    start = prev = None
    for c in cores + [None]:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(runs)


def allowed_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def configure_cpu(threads: int | None = None) -> str:
    """Apply threads and affinity for a CPU engine; returns the line it logs."""
    cores = allowed_cores()
    pinned = os.environ.get(CORES_ENV)
    if pinned:
        wanted = parse_cores(pinned)
        missing = sorted(set(wanted) - set(cores))
        if missing:
            raise ValueError(f"{CORES_ENV}={pinned}: cores {format_cores(missing)} are not "
                             f"available to this process (allowed: {format_cores(cores)})")
        os.sched_setaffinity(0, wanted)
        cores = wanted
    n = threads or len(cores)
    if n > len(cores):
        logger.warning("cpu_threads=%d exceeds the %d cores this process may use", n, len(cores))
    torch.set_num_threads(n)
    line = (f"CPU engine: {n} thread{'' if n == 1 else 's'} on cores {format_cores(cores)}"
            f" ({'pinned by ' + CORES_ENV if pinned else 'all this process may use'})")
    logger.info(line)
    return line

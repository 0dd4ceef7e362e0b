"""Starting a replica group: the N-1 ``TPWorker`` ranks beside rank 0 (the engine itself).

Two launchers start them:
- ``ray``: Ray actors in the replica's placement group (Serve creates the group from the
  deployment's bundles; offline, :class:`ReplicaGroup` makes one, STRICT_PACK by default), one
  bundle per rank, rank 0 in bundle 0. Ray carries the rendezvous address to the workers.
- ``processes``: local processes (torch.multiprocessing, spawn), for machines without Ray; the
  GPU tests use it.

Either way the workers build their communicator and model shard, then sit in
:func:`tp_group.follow`. Ray is imported only by the Ray launcher.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from .communicator import (
    ReplicaGroupFailed,
    create_communicator,
    free_address,
    oneccl_rendezvous,
)
from .config import EngineConfig

logger = logging.getLogger(__name__)


def rank_device(config: EngineConfig, rank: int, launcher: str) -> torch.device:
    """A rank's device: a Ray actor sees only its own GPU (index 0); a local process takes the
    device ``rank`` places after rank 0's. Over gloo, local ranks wrap around the devices there
    are, so the sharded code runs on one GPU too (a correctness check: NCCL needs one GPU per
    rank, and gloo stages every collective through the host)."""
    base = torch.device(config.device)
    if base.type == "cpu":
        return base
    if launcher == "ray":
        return torch.device(base.type, 0)
    index = (base.index or 0) + rank
    if config.communicator == "gloo" and base.type == "cuda":
        index %= torch.cuda.device_count()
    return torch.device(base.type, index)


class TPWorker:
    """One rank > 0: its communicator, its model shard and KV pool, and the follow loop."""

    def __init__(self, config: dict[str, Any], model_path: str, rank: int, world_size: int,
                 address: str, kvs_address: bytes | None, launcher: str) -> None:
        from .model_runner import ModelRunner

        logging.basicConfig(level=logging.INFO)
        cfg = EngineConfig(**config)
        device = rank_device(cfg, rank, launcher)
        cfg = dataclasses.replace(cfg, device=str(device))
        if device.type == "cpu" and cfg.cpu_threads is None:
            cfg = dataclasses.replace(cfg, cpu_threads=max(1, (os.cpu_count() or 1)
                                                           // world_size))
        self.comm = create_communicator(cfg.communicator, rank, world_size, address, device,
                                        cfg.collective_timeout_s, kvs_address)
        self.runner = ModelRunner(cfg, Path(model_path), self.comm)

    def run(self) -> None:
        from .tp_group import follow

        try:
            follow(self.runner)
        finally:
            self.comm.close()


def _whereabouts(_: Any) -> tuple[int, str]:
    """(pid, node id) of the worker it runs in (through ``__ray_call__``)."""
    import ray

    return os.getpid(), ray.get_runtime_context().get_node_id()


def _stopped(pid: int) -> bool:
    """Whether the local process is stopped (SIGSTOP, a debugger): alive, but it will never
    reach its next collective, so the ranks waiting there would wait out their timeout."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):  # gone (the liveness checks report that), or no /proc
        return False


def _process_main(config: dict, model_path: str, rank: int, world_size: int, address: str,
                  kvs_address: bytes | None) -> None:
    TPWorker(config, model_path, rank, world_size, address, kvs_address, "processes").run()


class ReplicaGroup:
    """Rank 0's handle on the other ranks: start them, check they live, stop them."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.launcher = config.tp_launcher
        self.address = free_address()
        self.kvs_address = (oneccl_rendezvous(self.world_size)
                            if config.communicator == "oneccl" else None)
        self._procs: list = []
        self._actors: list = []
        self._runs: list = []
        self._local_pids: dict[int, int] = {}  # rank: pid, the workers on this node
        self._where: list = []  # Ray workers' (pid, node id), until they answer
        self._pg = None
        args = (dataclasses.asdict(config), str(model_path))
        if self.launcher == "processes":
            ctx = torch.multiprocessing.get_context("spawn")
            for rank in range(1, self.world_size):
                p = ctx.Process(target=_process_main, daemon=True,
                                args=(*args, rank, self.world_size, self.address,
                                      self.kvs_address))
                p.start()
                self._procs.append(p)
        elif self.launcher == "ray":
            self._start_ray(args)
        else:
            raise ValueError(f"tp_launcher must be 'ray' or 'processes', got {self.launcher!r}")

    def _start_ray(self, args: tuple) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        pg = get_current_placement_group()
        gpu = torch.device(self.config.device).type != "cpu"
        if pg is None:  # offline: the group's own placement group
            bundle = {"CPU": float(self.config.cpu_threads or 1), **({"GPU": 1.0} if gpu else {})}
            pg = self._pg = placement_group([bundle] * self.world_size, strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=self.config.collective_timeout_s)
        if len(pg.bundle_specs) < self.world_size:
            raise ValueError(f"the replica's placement group has {len(pg.bundle_specs)} "
                             f"bundles; tensor_parallel_size {self.world_size} needs one per rank")
        worker = ray.remote(TPWorker)
        group_id = uuid.uuid4().hex[:8]
        for rank in range(1, self.world_size):
            bundle = pg.bundle_specs[rank]  # a worker takes its whole bundle
            actor = worker.options(
                name=f"TPWorker:{group_id}:{rank}",  # findable (ray list actors), not shared
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank),
            ).remote(*args, rank, self.world_size, self.address, self.kvs_address, "ray")
            self._actors.append(actor)

    def follow(self) -> None:
        """After every rank built its runner: start the workers' follow loops (Ray)."""
        self._local_pids = {rank: p.pid for rank, p in enumerate(self._procs, start=1)}
        # Ray workers: asked, not waited for (check() reads the answers once they are in).
        self._where = [a.__ray_call__.remote(_whereabouts) for a in self._actors]
        self._runs = [a.run.remote() for a in self._actors]

    def check_not_stopped(self) -> None:
        """Raises ReplicaGroupFailed if a worker on this node is stopped. For the health check,
        while a step waits in a collective (between steps a stopped rank does no harm yet, so
        the step loop does not pay for reading /proc)."""
        if self._where:
            self._locate_workers()
        for rank, pid in self._local_pids.items():
            if _stopped(pid):
                raise ReplicaGroupFailed(f"tensor-parallel rank {rank} is stopped (pid {pid})")

    def check(self) -> None:
        """Raises ReplicaGroupFailed if a worker is gone. Thread-safe."""
        for rank, p in enumerate(self._procs, start=1):
            if not p.is_alive():
                raise ReplicaGroupFailed(f"tensor-parallel rank {rank} exited "
                                         f"(code {p.exitcode})")
        if self._runs:
            import ray

            done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
            for ref in done:
                rank = self._runs.index(ref) + 1
                try:
                    ray.get(ref)
                    why = "left its loop"
                except Exception as e:  # ActorDiedError and the like
                    why = f"died ({type(e).__name__})"
                raise ReplicaGroupFailed(f"tensor-parallel rank {rank} {why}")

    def _locate_workers(self) -> None:
        import ray

        ready, _ = ray.wait(self._where, num_returns=len(self._where), timeout=0)
        if len(ready) < len(self._where):
            return
        refs, self._where = self._where, []  # asked once, whatever the answer
        try:
            where = ray.get(refs)
        except Exception:  # a worker died first: the run futures' check names it
            return
        here = ray.get_runtime_context().get_node_id()
        self._local_pids = {rank: pid for rank, (pid, node) in enumerate(where, start=1)
                            if node == here}  # fmt: skip
        logger.info("replica group ranks on this node (rank: pid): %s", self._local_pids)

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self._procs:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            if self._pg is not None:
                ray.util.remove_placement_group(self._pg)
        self._procs, self._actors, self._runs, self._local_pids, self._where = [], [], [], {}, []

    def kill(self, rank: int) -> None:
        """Tests: take one worker down the hard way."""
        if self._procs:
            self._procs[rank - 1].kill()
        else:
            import ray

            ray.kill(self._actors[rank - 1])

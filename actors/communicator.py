"""The replica group's communicator: all-reduce (in place), broadcast and all-gather between
its tensor-parallel ranks, over one of four backends.

- ``nccl``: CUDA devices (torch.distributed's NCCL);
- ``xccl``: Intel GPUs (built into PyTorch's XPU builds; a code path that cannot run here);
- ``oneccl``: CPU, through our own small binding (actors/oneccl/), when it builds and loads;
- ``gloo``: CPU otherwise (and the fallback when oneCCL is unavailable, said in the log).

Rank 0 picks the rendezvous address and hands it to the other ranks (through Ray, or through
the process launcher offline). Every collective has a timeout, so a dead rank surfaces as an
error on the others, never as a hang.
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "xccl", "oneccl", "gloo")
NCCL_CLOSE_TIMEOUT_S = 10.0


class ReplicaGroupFailed(RuntimeError):
    """A rank of the replica group is gone, or a collective failed (a dead peer, a timeout):
    the ranks' collectives no longer pair up, so the whole group is done."""


@contextmanager
def _collective(what: str):
    """A backend's error inside a collective becomes :class:`ReplicaGroupFailed`, so callers
    that fail single requests on ordinary errors (the sampler) let it through instead."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, ReplicaGroupFailed):
            raise
        raise ReplicaGroupFailed(f"{what} failed: {e}") from e


class Communicator:
    """One rank's end of the group. Tensors live on ``device``."""

    name = "single"

    def __init__(self, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns ``t``."""
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world_size, *t.shape]``: every rank's ``t``, in rank order."""
        return t[None]

    def close(self) -> None:
        pass

    def broadcast_cpu(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast of a host tensor (the control channel); the data path's own broadcast
        where that is a CPU backend."""
        return self.broadcast(t, src)

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """A picklable object from ``src`` to every rank, over the host channel: one broadcast
        of a fixed ``CONTROL_BYTES`` buffer (length, then the pickle), and a second only for
        the rest of a larger object. The control path: rank 0 sends each step's inputs and
        commands this way; on GPUs it never waits for the device's queue, so a follower gets
        step N+1's inputs while step N still runs."""
        if self.world_size == 1:
            return obj
        room = CONTROL_BYTES - 8
        buf = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
        if self.rank == src:
            data = pickle.dumps(obj, protocol=5)
            head = len(data).to_bytes(8, "little") + data[:room]
            buf[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
            self.broadcast_cpu(buf, src)
            if len(data) > room:
                rest = torch.frombuffer(bytearray(data[room:]), dtype=torch.uint8)
                self.broadcast_cpu(rest, src)
            return obj
        self.broadcast_cpu(buf, src)
        raw = buf.numpy().tobytes()
        size = int.from_bytes(raw[:8], "little")
        data = raw[8 : 8 + min(size, room)]
        if size > room:
            rest = torch.empty(size - room, dtype=torch.uint8)
            self.broadcast_cpu(rest, src)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


# One control broadcast carries a message of up to this many bytes (a decode step's inputs at
# small batch, a sampling plan); a larger one takes a second broadcast for the rest.
CONTROL_BYTES = 16384

# The control channel waits for rank 0's next message with no deadline: an idle replica group
# may hear nothing for hours. A dead peer still ends the wait at once (its connection closes).
CONTROL_TIMEOUT = timedelta(days=365)

class TorchDistCommunicator(Communicator):
    """A replica group's channels over one TCP store (not the process-wide default group, so
    one process may hold several groups, as offline code with two engines does):

    - control: a gloo group on the host, for :meth:`broadcast_object`, with no deadline;
    - data: nccl, xccl or gloo (another gloo group: its collectives have ``timeout_s``), or
      oneCCL (:class:`OneCCLCommunicator` in subclass :class:`OneCCLAdapter`).
    """

    def __init__(self, backend: str, rank: int, world_size: int, address: str,
                 device: torch.device, timeout_s: float) -> None:
        import torch.distributed as dist

        self.name = backend
        self._dist = dist
        if device.type == "cuda":
            if device.index is None:  # plain "cuda": the current device (NCCL needs an index)
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        super().__init__(rank, world_size, device)
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0,
                                   timeout=timeout)
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", self.store), rank,
                                             world_size, CONTROL_TIMEOUT)
        data = dist.PrefixStore(backend, self.store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(data, rank, world_size, timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(data, rank, world_size, opts)
        elif backend == "xccl":
            self.pg = dist.ProcessGroupXCCL(data, rank, world_size)
        elif backend == "oneccl":
            self.pg = None  # OneCCLAdapter's
        else:
            raise ValueError(f"no torch.distributed backend {backend!r}")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        with _collective("all-reduce"):
            self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        with _collective("broadcast"):
            self.pg.broadcast([t], self._root(src)).wait()
        return t

    def broadcast_cpu(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        with _collective("control broadcast"):
            self.control.broadcast([t], self._root(src)).wait()
        return t

    def _root(self, src: int):
        opts = self._dist.BroadcastOptions()
        opts.rootRank = src
        return opts

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.contiguous().reshape(-1)
        out = torch.empty(self.world_size * flat.numel(), dtype=t.dtype, device=t.device)
        with _collective("all-gather"):
            self.pg._allgather_base(out, flat).wait()
        return out.view(self.world_size, *t.shape)

    def close(self) -> None:
        pg, self.pg, self.control = self.pg, None, None
        shutdown = getattr(pg, "shutdown", None)
        if shutdown is None or self.name != "nccl":
            return
        # NCCL's shutdown is collective (every rank finalizes the communicator together), so it
        # waits forever for a rank that has exited; the replica group's shutdown has every rank
        # close at once, and this bound covers a rank that never will (it found rank 0 hanging
        # at exit on two H200s). After it the communicator is left to the process's exit.
        done = threading.Thread(target=shutdown, name="nccl-shutdown", daemon=True)
        done.start()
        done.join(NCCL_CLOSE_TIMEOUT_S)
        if done.is_alive():
            logger.warning("NCCL communicator of rank %d did not shut down within %.0f s; "
                           "leaving it", self.rank, NCCL_CLOSE_TIMEOUT_S)


class OneCCLAdapter(TorchDistCommunicator):
    """The oneCCL binding (actors/oneccl/) as the data path; control over gloo as always."""

    def __init__(self, rank: int, world_size: int, address: str, kvs_address: bytes,
                 timeout_s: float) -> None:
        from .oneccl import OneCCLCommunicator

        super().__init__("oneccl", rank, world_size, address, torch.device("cpu"), timeout_s)
        self._ccl = OneCCLCommunicator(rank, world_size, kvs_address, timeout_s=timeout_s)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        with _collective("oneCCL all-reduce"):
            return self._ccl.all_reduce(t)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        with _collective("oneCCL broadcast"):
            return self._ccl.broadcast(t, src)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        with _collective("oneCCL all-gather"):
            return self._ccl.all_gather(t.contiguous())

    def close(self) -> None:
        self._ccl.close()
        super().close()


def default_backend(device_type: str) -> str:
    return {"cuda": "nccl", "xpu": "xccl"}.get(device_type, "gloo")


def check_backend(backend: str, device_type: str) -> None:
    """A communicator that cannot run on ``device_type`` fails config validation, never start."""
    if backend not in BACKENDS:
        raise ValueError(f"communicator must be one of {', '.join(BACKENDS)}, got {backend!r}")
    allowed = {"cuda": ("nccl", "gloo"), "xpu": ("xccl", "gloo"), "cpu": ("oneccl", "gloo")}
    if backend not in allowed.get(device_type, ("gloo",)):
        raise ValueError(f"communicator {backend!r} does not run on {device_type!r} devices; "
                         f"use one of {', '.join(allowed.get(device_type, ('gloo',)))}")


def oneccl_rendezvous(world_size: int) -> bytes | None:
    """Rank 0, before the other ranks start: the oneCCL KVS address, or None (with one log
    line saying why) when the binding cannot build or load, and the group falls back to gloo."""
    from .oneccl import create_main_kvs, load_binding

    if load_binding() is None:
        logger.warning("oneCCL unavailable; the replica group uses gloo instead")
        return None
    return create_main_kvs(world_size)


def free_address() -> str:
    """A ``tcp://ip:port`` rendezvous on this node for torch.distributed."""
    ip = _node_ip()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ip}:{port}"


def _node_ip() -> str:
    try:  # the address other nodes reach us at (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def create_communicator(backend: str, rank: int, world_size: int, address: str,
                        device: torch.device, timeout_s: float = 300.0,
                        kvs_address: bytes | None = None) -> Communicator:
    """This rank's communicator (a collective call: every rank makes it at the same time)."""
    if world_size == 1:
        return Communicator(0, 1, device)
    if backend == "oneccl":
        if kvs_address is not None:
            return OneCCLAdapter(rank, world_size, address, kvs_address, timeout_s)
        backend = "gloo"
    return TorchDistCommunicator(backend, rank, world_size, address, device, timeout_s)

"""oneCCL collectives for CPU tensors, through our own small binding (oneccl_binding.cpp).

Intel's PyTorch binding (oneccl-bind-pt) is archived and not on the package index, so this
package compiles a small one against the oneCCL headers and library from PyPI's
`oneccl-cpu-devel` / `oneccl-cpu` wheels (the `oneccl` extra), or from a oneAPI install named by
`CCL_ROOT`. It is built on first use with torch.utils.cpp_extension into
`$SEGSERVE_CACHE_DIR/oneccl` (default `~/.cache/segserve/oneccl`), so later starts only load it.
It is optional: `load_binding()` returns None, with one warning naming the reason, when the
headers, the library or a compiler are missing or the build fails, and the caller falls back to
gloo.

Wire-up: rank 0 calls `create_main_kvs(world_size)`, which starts oneCCL's key-value store and
returns its address; the caller ships those bytes to the other ranks (through Ray), and then
every rank constructs `OneCCLCommunicator(rank, world_size, address)` at the same time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("oneccl_binding.cpp")

# oneCCL reads its environment once, at its first call in a process, so these are set before
# that (setdefault: a user's own setting wins). CCL_LOCAL_RANK / CCL_LOCAL_SIZE are set per rank
# in _configure_env.
_ENV_DEFAULTS = {
    # Our ranks are Ray actors or torch.multiprocessing children, not mpiexec's: with the default
    # launcher (hydra) oneCCL would look for a PMI server that doesn't exist. With "none" it takes
    # the ranks from create_communicator and the node-local ones from CCL_LOCAL_RANK/SIZE.
    "CCL_PROCESS_LAUNCHER": "none",
    # Data travels over libfabric (shipped in the impi-rt wheel); the default transport, MPI,
    # needs an MPI launcher too.
    "CCL_ATL_TRANSPORT": "ofi",
    # Ranks on one node exchange through shared memory (libfabric's shm provider), other nodes
    # over TCP. Measured here, 2 ranks: a 2 MiB bf16 all-reduce 3.2 ms with it against 11 ms
    # over loopback TCP (gloo 7.5 ms); 8 KiB ones alike (~0.1 ms).
    "CCL_ATL_SHM": "1",
    # The calling thread drives each collective itself. By default oneCCL hands the work to a
    # worker thread pinned to one of the last cores while the caller waits for it; with the
    # model's threads on every core the two contend, and on a 2-core box a 4096-element bf16
    # all-reduce took ~30 ms that way against ~0.6 ms with offload off.
    "CCL_WORKER_OFFLOAD": "0",
    # CPU only: don't probe for Level Zero GPUs.
    "CCL_ZE_ENABLE": "0",
    # oneCCL warns about every CCL_* variable that differs from its default, ours included.
    "CCL_LOG_LEVEL": "error",
}


class _Unavailable(Exception):
    """Why the binding can't be built or loaded here."""


@functools.cache
def _binding_or_reason() -> ModuleType | str:
    try:
        return _build()
    except _Unavailable as e:
        return str(e)
    except Exception as e:  # a failed compile or link: cpp_extension raises RuntimeError
        lines = [line for line in str(e).splitlines() if line.strip()]
        return f"building the oneCCL binding failed: {' | '.join(lines[-6:])}"


def load_binding() -> ModuleType | None:
    """The compiled binding, or None (logging one warning with the reason) where it can't be had."""
    result = _binding_or_reason()
    if isinstance(result, str):
        _warn_once(result)
        return None
    return result


def unavailable_reason() -> str | None:
    """Why `load_binding()` returns None, or None when the binding is available."""
    result = _binding_or_reason()
    return result if isinstance(result, str) else None


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("oneCCL is unavailable, falling back to gloo: %s", reason)


def create_main_kvs(world_size: int, local_size: int | None = None) -> bytes:
    """Rank 0: start oneCCL's main key-value store in this process; returns its address bytes.

    The store lives until the process exits. oneCCL fixes its node-local layout at this first
    call, so it needs the group's `world_size` now (or `local_size`, the group's ranks on this
    node, when the group spans nodes): ranks that disagree about it can't open shared memory
    between them and fail to join.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    binding = _require_binding()
    _configure_env(local_rank=0, local_size=local_size or world_size)
    return binding.create_main_kvs()


class OneCCLCommunicator:
    """A oneCCL communicator over CPU tensors: in-place all-reduce (sum) and broadcast, and
    all-gather. Constructing it is a collective: every rank of the group must do so at once.

    `timeout_s` bounds each collective (a dead or stuck peer raises RuntimeError, and the
    communicator is unusable afterwards); None waits forever, like oneCCL itself. Joining is
    bounded by oneCCL's KVS timeout (CCL_KVS_GET_TIMEOUT, 60 s by default).
    """

    name = "oneccl"

    def __init__(
        self,
        rank: int,
        world_size: int,
        kvs_address: bytes,
        *,
        local_rank: int | None = None,
        local_size: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        binding = _require_binding()
        _configure_env(
            local_rank=rank if local_rank is None else local_rank,
            local_size=world_size if local_size is None else local_size,
        )
        self.rank = rank
        self.world_size = world_size
        self._comm = binding.Communicator(rank, world_size, bytes(kvs_address), timeout_s or 0.0)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns `t`."""
        _check(t, "all_reduce", _REDUCIBLE)
        if t.numel() == 0:
            return t
        if t.dtype in _HALF_FLOATS and not _reduces_16bit_floats():
            buf = t.float()  # oneCCL sums 16-bit floats on AVX-512 CPUs only
        else:
            buf = t.contiguous()
        self._comm.all_reduce(buf)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` on every rank with rank `src`'s `t`, in place; returns `t`."""
        _check(t, "broadcast", _MOVABLE)
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast src {src} is outside world_size {self.world_size}")
        if t.numel() == 0:
            return t
        buf = t.contiguous()
        self._comm.broadcast(_as_bits(buf), src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, stacked in rank order: a new tensor of shape [world_size, *t.shape]."""
        _check(t, "all_gather", _MOVABLE)
        if t.numel() == 0:
            return t.new_empty((self.world_size, *t.shape))
        return self._comm.all_gather(_as_bits(t.contiguous())).view(t.dtype)

    def barrier(self) -> None:
        self._comm.barrier()

    def close(self) -> None:
        self._comm.close()


_HALF_FLOATS = (torch.bfloat16, torch.float16)
_REDUCIBLE = frozenset(
    {torch.float32, torch.float64, *_HALF_FLOATS, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8}
)
_MOVABLE = _REDUCIBLE | {torch.bool}
# broadcast and all_gather only move bits, so 16-bit floats and bools travel as integers of their
# width: that needs no float support from the CPU.
_BITS_AS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_AS.get(t.dtype, t.dtype))


def _check(t: torch.Tensor, op: str, dtypes: frozenset[torch.dtype]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"oneCCL {op} takes a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"oneCCL {op} takes CPU tensors, got one on {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"oneCCL {op} does not support {t.dtype}")


@functools.cache
def _reduces_16bit_floats() -> bool:
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def _require_binding() -> ModuleType:
    binding = load_binding()
    if binding is None:
        raise RuntimeError(f"oneCCL is unavailable: {unavailable_reason()}")
    return binding


_configured: tuple[int, int] | None = None  # this process's (local rank, local size)


def _configure_env(local_rank: int, local_size: int) -> None:
    global _configured
    if _configured is not None:  # oneCCL has read its environment already
        if _configured != (local_rank, local_size):
            raise ValueError(
                f"oneCCL in this process is set up as local rank {_configured[0]} of "
                f"{_configured[1]}, not {local_rank} of {local_size}: pass create_main_kvs the "
                "group's world_size (or local_size)"
            )
        return
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} is outside local size {local_size}")
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["CCL_LOCAL_RANK"] = str(local_rank)
    os.environ["CCL_LOCAL_SIZE"] = str(local_size)
    _configured = (local_rank, local_size)


def _cache_dir() -> Path:
    root = os.environ.get("SEGSERVE_CACHE_DIR") or Path.home() / ".cache" / "segserve"
    return Path(root) / "oneccl"


def _find_file(dists: tuple[str, ...], suffix: str) -> Path | None:
    """Where one of the installed wheels `dists` put a file whose path ends with `suffix`."""
    for dist in dists:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        name = suffix.rsplit("/", 1)[-1]
        for entry in files:
            if entry.name == name:
                # data files are recorded relative to site-packages ("../../libccl.so.1")
                path = Path(entry.locate()).resolve()
                if path.as_posix().endswith(suffix) and path.exists():
                    return path
    return None


def _locate_oneccl() -> tuple[Path, Path]:
    """(include dir, lib dir) of oneCCL: a oneAPI install (CCL_ROOT) first, then the wheels."""
    root = os.environ.get("CCL_ROOT")
    if root and (Path(root) / "include" / "oneapi" / "ccl.hpp").exists():
        return Path(root) / "include", Path(root) / "lib"
    header = _find_file(("oneccl-cpu-devel", "oneccl-devel"), "include/oneapi/ccl.hpp")
    if header is None:
        raise _Unavailable(
            "no oneCCL headers: install segserve's `oneccl` extra (oneccl-cpu-devel) "
            "or set CCL_ROOT to a oneAPI oneCCL install"
        )
    library = _find_file(("oneccl-cpu", "oneccl"), "lib/libccl.so.1")
    if library is None:
        raise _Unavailable("no oneCCL library (libccl.so.1): install the oneccl-cpu wheel")
    return header.parent.parent, library.parent


def _check_loads(lib_dir: Path) -> None:
    try:
        ctypes.CDLL(str(lib_dir / "libccl.so.1"))
    except OSError as e:
        hint = ""
        if "libccl.so.2" in str(e):
            # oneccl-cpu 2021.17 onwards ships a libccl.so.1 that needs libccl.so.2, which only
            # the full (SYCL) `oneccl` wheel has; pyproject's `oneccl` extra pins below that.
            hint = "; oneccl-cpu wheels from 2021.17 on lack libccl.so.2, use oneccl-cpu<2021.17"
        raise _Unavailable(f"{lib_dir / 'libccl.so.1'} does not load: {e}{hint}") from e


def _build() -> ModuleType:
    if sys.platform != "linux":
        raise _Unavailable(f"oneCCL's wheels are Linux-only, this is {sys.platform}")
    include_dir, lib_dir = _locate_oneccl()
    _check_loads(lib_dir)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler ({compiler}) to build the oneCCL binding")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise _Unavailable("torch.utils.cpp_extension needs ninja: pip install ninja")
    # One build per (torch, Python, oneCCL) combination; cpp_extension itself rebuilds when the
    # source changes and takes a lock, so ranks starting together build once.
    key = hashlib.sha256(f"{torch.__version__}|{sys.version}|{lib_dir}".encode()).hexdigest()[:12]
    build_dir = _cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="segserve_oneccl",
        sources=[str(_SOURCE)],
        extra_include_paths=[str(include_dir)],
        extra_cflags=["-O2"],
        extra_ldflags=[f"-L{lib_dir}", "-lccl", f"-Wl,-rpath,{lib_dir}"],
        build_directory=str(build_dir),
        verbose=False,
    )

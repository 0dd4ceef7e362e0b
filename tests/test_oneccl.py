"""The oneCCL communicator (actors/oneccl) against torch.distributed's gloo and hand-made values.

Two ranks run in processes started with torch.multiprocessing (spawn); each joins a gloo group
(the oracle, and the channel that ships rank 0's KVS address, as Ray does in the service) and a
oneCCL communicator. Skipped where the binding can't be built or loaded here. The first run
compiles the binding (~20 s of CPU) into the segserve cache; later runs only load it.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from segserve.actors import oneccl

WORLD = 2


@pytest.fixture(scope="module")
def binding():
    module = oneccl.load_binding()
    if module is None:
        pytest.skip(f"the oneCCL binding can't be built or loaded: {oneccl.unavailable_reason()}")
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, timeout_s: float | None) -> oneccl.OneCCLCommunicator:
    """A oneCCL communicator; rank 0's KVS address travels over the gloo group."""
    address = [oneccl.create_main_kvs(WORLD) if rank == 0 else None]
    dist.broadcast_object_list(address, src=0)
    return oneccl.OneCCLCommunicator(rank, WORLD, address[0], timeout_s=timeout_s)


def _rank_tensor(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A random tensor that every rank can recompute for any other rank."""
    g = torch.Generator().manual_seed(1000 * rank + len(shape))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64).to(dtype)


def _rank_main(rank: int, port: int) -> None:
    # one spawn for both checks: starting a rank (importing torch) is most of this test's time
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    _collectives(rank)
    _peer_missing(rank)
    dist.destroy_process_group()


def _collectives(rank: int) -> None:
    comm = _join(rank, timeout_s=60.0)
    assert (comm.name, comm.rank, comm.world_size) == ("oneccl", rank, WORLD)

    # all_reduce equals gloo's, in place
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for shape in ((4096,), (3, 5, 7), ()):
            t = _rank_tensor(rank, shape, dtype)
            expected = t.clone()
            dist.all_reduce(expected)
            out = comm.all_reduce(t)
            assert out is t
            torch.testing.assert_close(t, expected, rtol=0, atol=0)
            if dtype == torch.float32:  # and the hand-computed sum
                total = _rank_tensor(0, shape, dtype) + _rank_tensor(1, shape, dtype)
                torch.testing.assert_close(t, total, rtol=0, atol=0)

    # on CPUs without AVX-512, bf16 sums go through fp32: the same result for two ranks
    avx512 = oneccl._reduces_16bit_floats
    oneccl._reduces_16bit_floats = lambda: False
    t = _rank_tensor(rank, (64,), torch.bfloat16)
    expected = t.clone()
    dist.all_reduce(expected)
    assert torch.equal(comm.all_reduce(t), expected)
    oneccl._reduces_16bit_floats = avx512

    # a non-contiguous view is reduced in place in its base tensor
    base = torch.full((4, 6), float(rank + 1))
    comm.all_reduce(base[:, ::2])
    assert base[:, ::2].eq(3.0).all() and base[:, 1::2].eq(rank + 1).all()

    # broadcast from either rank overwrites the others; token ids (int64), masks, bytes, bf16
    for src in (0, 1):
        for dtype in (torch.int64, torch.uint8, torch.bool, torch.bfloat16):
            source = _rank_tensor(src, (2, 9), torch.float32).gt(0) if dtype == torch.bool else (
                _rank_tensor(src, (2, 9), dtype)
            )
            t = source.clone() if rank == src else torch.zeros_like(source)
            assert comm.broadcast(t, src=src) is t
            assert torch.equal(t, source)

    # all_gather stacks every rank's tensor in rank order
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        gathered = comm.all_gather(_rank_tensor(rank, (3, 4), dtype))
        expected = torch.stack([_rank_tensor(r, (3, 4), dtype) for r in range(WORLD)])
        assert gathered.dtype == dtype and gathered.shape == (WORLD, 3, 4)
        assert torch.equal(gathered, expected)

    # bad input is a clear error, and leaves the communicator usable
    with pytest.raises(ValueError, match="complex"):
        comm.all_reduce(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="src 2"):
        comm.broadcast(torch.zeros(2), src=2)
    with pytest.raises(ValueError, match=f"set up as local rank {rank} of 2, not {rank} of 3"):
        oneccl.OneCCLCommunicator(rank, 3, b"")  # oneCCL's node layout is fixed per process
    comm.barrier()
    one = comm.all_reduce(torch.ones(1, dtype=torch.int64))
    assert one.item() == WORLD
    comm.close()


def _peer_missing(rank: int) -> None:
    """A rank that never arrives makes the others' collective fail, not hang."""
    comm = _join(rank, timeout_s=2.0)
    if rank == 0:  # rank 1 never joins this all-reduce
        with pytest.raises(RuntimeError, match="all_reduce on rank 0 timed out"):
            comm.all_reduce(torch.ones(8))
        with pytest.raises(RuntimeError, match="unusable"):
            comm.barrier()
    dist.barrier()  # rank 1 leaves only after rank 0 has seen the timeout
    comm.close()


def test_collectives_equal_gloo_and_time_out_without_a_peer(binding):
    mp.spawn(_rank_main, args=(_free_port(),), nprocs=WORLD, join=True)


def test_missing_oneccl_falls_back_with_one_warning(monkeypatch, caplog):
    def not_installed(name):
        raise oneccl.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("CCL_ROOT", raising=False)
    monkeypatch.setattr(oneccl.importlib.metadata, "files", not_installed)
    oneccl._binding_or_reason.cache_clear()
    oneccl._warn_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=oneccl.__name__):
            assert oneccl.load_binding() is None
            assert oneccl.load_binding() is None
        assert "no oneCCL headers" in oneccl.unavailable_reason()
        warnings = [r.getMessage() for r in caplog.records if r.name == oneccl.__name__]
        assert len(warnings) == 1 and "falling back to gloo" in warnings[0]
        with pytest.raises(RuntimeError, match="oneCCL is unavailable: no oneCCL headers"):
            oneccl.OneCCLCommunicator(0, 2, b"")
    finally:
        oneccl._binding_or_reason.cache_clear()
        oneccl._warn_once.cache_clear()

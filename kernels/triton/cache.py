"""Whole-block copies in every layer of the KV pools (copy-on-write after a fork).

One launch for K and V together; the block ids are read on the device, so the op has no host
sync. Destinations must not also be sources in the same call (the engine copies into fresh
blocks), since programs run in no fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _copy_blocks_kernel(k_pool, v_pool, src, dst, stride_layer, stride_block, block_elems,
                        BLOCK: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_elems
    s = tl.load(src + pair).to(tl.int64)
    d = tl.load(dst + pair).to(tl.int64)
    from_off = layer * stride_layer + s * stride_block + offs
    to_off = layer * stride_layer + d * stride_block + offs
    tl.store(k_pool + to_off, tl.load(k_pool + from_off, mask=mask), mask=mask)
    tl.store(v_pool + to_off, tl.load(v_pool + from_off, mask=mask), mask=mask)


def copy_blocks(
    k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """``pool[:, dst[i]] = pool[:, src[i]]`` for pools ``[layers, num_blocks, ...]``."""
    if k_pool.shape != v_pool.shape or k_pool.stride() != v_pool.stride():
        raise ValueError("copy_blocks: k and v pools must have the same shape and strides")
    if not (k_pool[0, 0].is_contiguous() and k_pool.stride(1) == k_pool[0, 0].numel()):
        raise ValueError(f"copy_blocks: pool blocks must be contiguous, strides {k_pool.stride()}")
    num_layers, block_elems = k_pool.shape[0], k_pool[0, 0].numel()
    if src.numel() == 0 or num_layers == 0:
        return
    grid = (src.numel(), num_layers, triton.cdiv(block_elems, BLOCK))
    _copy_blocks_kernel[grid](
        k_pool, v_pool, src, dst, k_pool.stride(0), k_pool.stride(1), block_elems,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip

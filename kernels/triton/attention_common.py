"""The online-softmax loop over one KV segment, shared by the decode and prefill kernels.

A tile of ``BLOCK_M`` query rows walks a token range of one segment (prompt or response) in chunks
of ``BLOCK_N`` tokens. Each chunk gathers its tokens through the segment's block table one token
row at a time (``[BLOCK_N, D]`` loads of contiguous head rows), so a chunk may span several cache
blocks and the chunk size is independent of the block size. Scores live in the log2 domain
(``qk_scale`` includes log2(e)).

The running state is ``(acc [M, D], m [M], l [M])``: unnormalised output, running max and
running sum. A row that has seen no visible key keeps ``m = -inf, l = 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot

LOG2E = 1.4426950408889634


@triton.jit
def attend_segment(
    acc, m_i, l_i, q,
    k_cache, v_cache, table_ptr,
    stride_kb, stride_ks, stride_vb, stride_vs, k_head_off, v_head_off,
    seg_offset, start, end, q_pos, k_lo, qk_scale,
    offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Fold segment tokens ``[start, end)`` into the state. A token at segment index ``n`` sits at
    context position ``seg_offset + n``; query row ``r`` sees positions in
    ``[k_lo[r], q_pos[r]]`` (causality and the sliding window)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        in_seg = tok < end
        block = tl.load(table_ptr + tok // BLOCK_SIZE, mask=in_seg, other=0).to(tl.int64)
        in_block = (tok % BLOCK_SIZE).to(tl.int64)
        kv_mask = in_seg[:, None] & d_mask[None, :]
        k_ptrs = k_cache + (block * stride_kb + in_block * stride_ks + k_head_off)[:, None]
        k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), IEEE) * qk_scale
        pos = seg_offset + tok
        visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= k_lo[:, None])
        visible = visible & in_seg[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep zeros
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_cache + (block * stride_vb + in_block * stride_vs + v_head_off)[:, None]
        v = tl.load(v_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
        # Probabilities in the cache dtype for the tensor-core product, as flash attention does.
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, m_i, l_i


def kv_chunk(head_dim_pad: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: [64, 128] bf16 K and V tiles stay in registers; halve it for D = 256 and
    for float32, whose exact (FMA) dot needs far more registers."""
    return 64 if head_dim_pad <= 128 and dtype != torch.float32 else 32


def num_warps(head_dim_pad: int, dtype: torch.dtype) -> int:
    return 4 if head_dim_pad <= 128 and dtype != torch.float32 else 8

"""Prefill (and mixed-batch) attention over both segments, with a cached prefix.

Varlen: sequence ``i`` has ``q_len`` new queries (``cu_seqlens_q``), the last ``q_len`` positions
of its ``prompt_len + response_len`` context; keys come from both segments through their block
tables, causally, within the sliding window. Grid ``(query tiles, B, H)``: tiles past a row's
``q_len`` exit at once, so one launch serves ragged batches and rows with ``q_len == 1``.
Prefill is not graph-captured: the grid reads ``max_q_len`` from the host metadata.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..interface import AttentionMetadata
from ._common import pow2
from .attention_common import LOG2E, attend_segment, kv_chunk, num_warps


def query_tile(dtype: torch.dtype) -> int:
    """Queries per program; float32's exact FMA dot spills at 64."""
    return 32 if dtype == torch.float32 else 64


@triton.jit(do_not_specialize=["window"])
def _prefill_kernel(
    q, stride_qt, stride_qh, out, stride_ot, stride_oh,
    k_cache, v_cache, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    cu_seqlens, prompt_tables, stride_pt, response_tables, stride_rt, prompt_lens, response_lens,
    qk_scale, window,
    QPK: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens + seq)
    q_len = tl.load(cu_seqlens + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    plen = tl.load(prompt_lens + seq)
    ctx = plen + tl.load(response_lens + seq)
    first_q = ctx - q_len  # context position of the row's first new query
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    q_pos = tl.where(m_ok, first_q + offs_m, -1)
    # Keys of the tile: positions [lo, hi), the union of its rows' windows.
    hi = first_q + tl.minimum((tile + 1) * BLOCK_M, q_len)
    if HAS_WINDOW:
        k_lo = q_pos - window + 1
        lo = tl.maximum(first_q + tile * BLOCK_M - window + 1, 0)
    else:
        k_lo = tl.zeros_like(q_pos)
        lo = 0

    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    io_mask = m_ok[:, None] & d_mask[None, :]
    q_tile = tl.load(
        q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=io_mask, other=0.0
    )
    kvh = h // QPK
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    seq64 = seq.to(tl.int64)
    acc, m_i, l_i = attend_segment(
        acc, m_i, l_i, q_tile,
        k_cache, v_cache, prompt_tables + seq64 * stride_pt,
        stride_kb, stride_ks, stride_vb, stride_vs, kvh * stride_kh, kvh * stride_vh,
        0, lo, tl.minimum(hi, plen), q_pos, k_lo, qk_scale,
        offs_d, d_mask, BLOCK_SIZE, BLOCK_N, IEEE,
    )  # fmt: skip
    acc, m_i, l_i = attend_segment(
        acc, m_i, l_i, q_tile,
        k_cache, v_cache, response_tables + seq64 * stride_rt,
        stride_kb, stride_ks, stride_vb, stride_vs, kvh * stride_kh, kvh * stride_vh,
        plen, tl.maximum(lo - plen, 0), hi - plen, q_pos, k_lo, qk_scale,
        offs_d, d_mask, BLOCK_SIZE, BLOCK_N, IEEE,
    )  # fmt: skip
    res = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], res, mask=io_mask)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = meta.cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    d_pad = pow2(head_dim)
    ptab, rtab = meta.prompt_block_tables, meta.response_block_tables
    block_m = query_tile(q.dtype)
    grid = (triton.cdiv(meta.max_q_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
        k_cache, v_cache, *k_cache.stride()[:3], *v_cache.stride()[:3],
        meta.cu_seqlens_q, ptab, ptab.stride(0), rtab, rtab.stride(0),
        meta.prompt_lens, meta.response_lens,
        scale * LOG2E, sliding_window or 0,
        QPK=num_heads // num_kv_heads, HAS_WINDOW=sliding_window is not None, BLOCK_M=block_m,
        BLOCK_N=kv_chunk(d_pad, q.dtype), BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=d_pad,
        IEEE=q.dtype == torch.float32, num_warps=num_warps(d_pad, q.dtype), num_stages=2,
    )  # fmt: skip
    return out

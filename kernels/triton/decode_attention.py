"""Segment decode attention: one new query per sequence, flash-decoding over both segments.

Three launches, each sized by tensor shapes only, with no host reads or device->host syncs, so a
CUDA graph can capture them (per-row lengths, tables and groups are read on the device):

1. Prompt partials, grid ``(B, Hkv, prompt splits)``. Rows that share a prompt segment (beams,
   n samples: the same prompt table and length) are contiguous in the batch and marked by
   ``prompt_group_start``; every row of a group reads the prompt through the table of the group's
   first row. A group is cut into tiles of ``G_TILE`` rows; the program of a tile's first row
   loads each prompt K/V chunk once for the ``G_TILE * QPK`` query heads of its tile (all query
   heads of one KV head, for every row of the tile); programs of other rows exit. This is the
   shared-prefix half of FlashInfer's cascade attention.
2. Response partials, grid ``(B, Hkv, response splits)``: each row's private blocks.
3. Merge, grid ``(B, H)``: the partial results of all splits of both segments are combined by
   their log-sum-exp (``merge_state`` in FlashInfer's terms).

Splits (split-K) cut a segment's token range into equal pieces: their number is fixed by the
block-table width and the batch shape, their length is computed on the device from the row's
length, and a split past the end writes an empty state (``lse = -inf``). Padding rows
(both lengths 0) come out as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..interface import AttentionMetadata, prompt_group_start_from_tables
from ._common import pow2
from .attention_common import LOG2E, attend_segment, kv_chunk, num_warps

MAX_SPLITS = 64
# Rows of one prompt group per program: at least 4 (beam-4 / n=4 loads its prompt once) and enough
# query rows for a 16-row tensor-core tile.
MIN_GROUP_TILE = 4


# Scalars that change from step to step are not specialized on, so they never trigger a compile.
@triton.jit(do_not_specialize=["split_base", "num_splits", "window", "batch"])
def _segment_partial_kernel(
    q, stride_qb, stride_qh,
    k_cache, v_cache, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    tables, stride_t, prompt_lens, response_lens, group_start,
    part_o, part_lse, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    split_base, num_splits, qk_scale, window, batch,
    PROMPT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, G_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // QPK_PAD
    head = offs_m % QPK_PAD
    row = b + member
    row_ok = (member < G_TILE) & (head < QPK) & (row < batch)
    if PROMPT:
        first_row = tl.load(group_start + b)
        if (b - first_row) % G_TILE != 0:
            return  # another program of the group takes this row
        row_ok = row_ok & (tl.load(group_start + row, mask=row_ok, other=-1) == first_row)
    plen = tl.load(prompt_lens + row, mask=row_ok, other=0)
    ctx = plen + tl.load(response_lens + row, mask=row_ok, other=0)
    q_pos = tl.where(row_ok, ctx - 1, -1)
    if HAS_WINDOW:
        k_lo = ctx - window
    else:
        k_lo = tl.zeros_like(ctx)
    if PROMPT:  # the group's prompt segment is its first row's
        seg_row = first_row
        seg_len = tl.load(prompt_lens + first_row)
        seg_offset = 0
    else:
        seg_row = b
        seg_len = tl.load(response_lens + b)
        seg_offset = tl.load(prompt_lens + b)
    # Tokens before the earliest window start of the tile are skipped, not masked.
    first = tl.maximum(tl.min(tl.where(row_ok, k_lo, 2147483647), 0) - seg_offset, 0)
    span = tl.cdiv(tl.cdiv(tl.maximum(seg_len - first, 0), num_splits), BLOCK_N) * BLOCK_N
    start = first + split * span
    end = tl.minimum(start + span, seg_len)

    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    q_head = kvh * QPK + head
    row64 = row.to(tl.int64)
    q_ptrs = q + row64[:, None] * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :]
    q_tile = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_segment(
        acc, m_i, l_i, q_tile,
        k_cache, v_cache, tables + seg_row.to(tl.int64) * stride_t,
        stride_kb, stride_ks, stride_vb, stride_vs, kvh * stride_kh, kvh * stride_vh,
        seg_offset, start, end, q_pos, k_lo, qk_scale,
        offs_d, d_mask, BLOCK_SIZE, BLOCK_N, IEEE,
    )  # fmt: skip
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    s = split_base + split
    o_ptrs = part_o + row64[:, None] * stride_ob + q_head[:, None] * stride_oh + s * stride_os
    tl.store(o_ptrs + offs_d[None, :], out, mask=row_ok[:, None] & d_mask[None, :])
    tl.store(part_lse + row64 * stride_lb + q_head * stride_lh + s, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    part_o, part_lse, out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_b, stride_h, num_splits,
    S_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    lse_row = part_lse + b * stride_lb + h * stride_lh
    offs_c = tl.arange(0, S_CHUNK)
    m = tl.full([S_CHUNK], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        splits = s0 + offs_c
        m = tl.maximum(m, tl.load(lse_row + splits, mask=splits < num_splits, other=float("-inf")))
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # all splits empty (padding): zeros
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    den = tl.zeros([S_CHUNK], dtype=tl.float32)
    for s0 in range(0, num_splits, S_CHUNK):
        splits = s0 + offs_c
        lse = tl.load(lse_row + splits, mask=splits < num_splits, other=float("-inf"))
        w = tl.exp2(lse - m_all)
        # An empty split's output was never written: only its weight (0) is read.
        o_mask = (lse > float("-inf"))[:, None] & d_mask[None, :]
        o_ptrs = part_o + b * stride_ob + h * stride_oh + splits[:, None] * stride_os
        o = tl.load(o_ptrs + offs_d[None, :], mask=o_mask, other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        den += w
    total = tl.sum(den, 0)
    res = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out + b * stride_b + h * stride_h + offs_d, res, mask=d_mask)


_SM_COUNT: dict[torch.device, int] = {}


def _target_programs(device: torch.device) -> int:
    """Programs that keep the GPU busy: 4 per SM (64 compute units assumed off CUDA). On CPU (the
    interpreter) splits are limited by length only."""
    if device.type == "cpu":
        return 1 << 30
    if device.type != "cuda":
        return 4 * 64
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * _SM_COUNT[device]


def num_splits(width_tokens: int, programs: int, split_tokens: int, device: torch.device) -> int:
    """Splits of a segment whose table holds ``width_tokens`` slots, when ``programs`` programs
    already run per split: enough to fill the GPU, none shorter than ``split_tokens``."""
    if width_tokens == 0:
        return 0
    by_len = triton.cdiv(width_tokens, split_tokens)
    by_occupancy = triton.cdiv(_target_programs(device), max(programs, 1))
    return max(1, min(by_len, by_occupancy, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    split_tokens: int,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    qpk, qpk_pad, d_pad = num_heads // num_kv_heads, pow2(num_heads // num_kv_heads), pow2(head_dim)
    group_start = meta.prompt_group_start
    if group_start is None:
        group_start = meta.scratch.get("prompt_group_start")
        if group_start is None:
            group_start = meta.scratch["prompt_group_start"] = prompt_group_start_from_tables(
                meta.prompt_block_tables, meta.prompt_lens
            )
    ptab, rtab = meta.prompt_block_tables, meta.response_block_tables
    programs = batch * num_kv_heads
    p_splits = num_splits(ptab.shape[1] * block_size, programs, split_tokens, q.device)
    r_splits = num_splits(rtab.shape[1] * block_size, programs, split_tokens, q.device)
    total = p_splits + r_splits
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if total == 0:
        return out.zero_()
    # One scratch pair per step, reused by every layer (they run one after another on a stream).
    key = ("triton_decode_partials", batch, num_heads, head_dim, total)
    if key not in meta.scratch:
        meta.scratch[key] = (
            torch.empty((batch, num_heads, total, head_dim), dtype=torch.float32, device=q.device),
            torch.empty((batch, num_heads, total), dtype=torch.float32, device=q.device),
        )
    part_o, part_lse = meta.scratch[key]
    block_n = kv_chunk(d_pad, q.dtype)
    common = dict(
        HAS_WINDOW=sliding_window is not None,
        QPK=qpk,
        QPK_PAD=qpk_pad,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps(d_pad, q.dtype),
        num_stages=2,
    )
    for prompt, tab, splits, base in ((True, ptab, p_splits, 0), (False, rtab, r_splits, p_splits)):
        if not splits:
            continue
        g_tile = max(MIN_GROUP_TILE, 16 // qpk_pad) if prompt else 1
        _segment_partial_kernel[(batch, num_kv_heads, splits)](
            q, q.stride(0), q.stride(1),
            k_cache, v_cache, *k_cache.stride()[:3], *v_cache.stride()[:3],
            tab, tab.stride(0), meta.prompt_lens, meta.response_lens, group_start,
            part_o, part_lse, *part_o.stride()[:3], *part_lse.stride()[:2],
            base, splits, scale * LOG2E, sliding_window or 0, batch,
            PROMPT=prompt, G_TILE=g_tile, BLOCK_M=max(16, g_tile * qpk_pad),
            **common,
        )  # fmt: skip
    _merge_kernel[(batch, num_heads)](
        part_o, part_lse, out,
        *part_o.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1), total,
        S_CHUNK=16, HEAD_DIM=head_dim, D_PAD=d_pad, num_warps=4,
    )  # fmt: skip
    return out

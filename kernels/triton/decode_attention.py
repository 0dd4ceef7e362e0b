"""Segment decode attention: one new query per sequence, flash-decoding over both segments.

One launch per layer, grid ``(B, Hkv, prompt splits + response splits)``, sized by tensor shapes
only, with no host reads or device->host syncs, so a CUDA graph can capture it (per-row lengths,
tables and groups are read on the device). At one row a decode step is bound by launch latency as
much as by bytes, so the partials and their merge share the launch:

1. Prompt splits (``split < p_splits``). Rows that share a prompt segment (beams, n samples: the
   same prompt table and length) are contiguous in the batch and marked by ``prompt_group_start``;
   every row of a group reads the prompt through the table of the group's first row. A group is
   cut into tiles of ``G_TILE`` rows; the program of a tile's first row loads each prompt K/V
   chunk once for the ``G_TILE * QPK`` query heads of its tile (all query heads of one KV head, for
   every row of the tile); programs of other rows exit. This is the shared-prefix half of
   FlashInfer's cascade attention.
2. Response splits: each row's private blocks.
3. Merge: each program counts, per row it wrote, one arrival on that (row, KV head)'s counter
   (an acquire-release atomic, so the partials written before it are visible to whoever counts
   last). The program that brings a counter to the number of splits combines the row's partials
   by their log-sum-exp (``merge_state`` in FlashInfer's terms), writes the output and resets the
   counter for the next layer: the split-K "fix-up" of stream-K GEMMs.

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
@triton.jit(do_not_specialize=["p_splits", "r_splits", "window", "batch"])
def _decode_kernel(
    q, stride_qb, stride_qh,
    k_cache, v_cache, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    prompt_tables, stride_pt, response_tables, stride_rt, prompt_lens, response_lens, group_start,
    part_o, part_lse, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    arrivals, out, stride_b, stride_h,
    p_splits, r_splits, qk_scale, window, batch,
    HAS_WINDOW: tl.constexpr, NUM_KV: tl.constexpr,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, G_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr, S_CHUNK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    prompt = split < p_splits
    first_row = tl.load(group_start + b)
    if prompt & ((b - first_row) % G_TILE != 0):
        return  # another program of the group takes this row's prompt
    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // QPK_PAD
    head = offs_m % QPK_PAD
    row = b + member
    tile = tl.where(prompt, G_TILE, 1)
    row_ok = (member < tile) & (head < QPK) & (row < batch)
    same_group = tl.load(group_start + row, mask=row_ok, other=-1) == first_row
    row_ok = row_ok & (same_group | (split >= p_splits))
    plen = tl.load(prompt_lens + row, mask=row_ok, other=0)
    ctx = plen + tl.load(response_lens + row, mask=row_ok, other=0)
    q_pos = tl.where(row_ok, ctx - 1, -1)
    if HAS_WINDOW:
        k_lo = ctx - window
    else:
        k_lo = tl.zeros_like(ctx)
    if prompt:  # the group's prompt segment is its first row's
        table = prompt_tables + first_row.to(tl.int64) * stride_pt
        seg_len = tl.load(prompt_lens + first_row)
        seg_offset = 0
        num_splits = p_splits
        seg_split = split
    else:
        table = response_tables + b.to(tl.int64) * stride_rt
        seg_len = tl.load(response_lens + b)
        seg_offset = tl.load(prompt_lens + b)
        num_splits = r_splits
        seg_split = split - p_splits
    # Tokens before the earliest window start of the tile are skipped, not masked.
    first = tl.maximum(tl.min(tl.where(row_ok, k_lo, 2147483647), 0) - seg_offset, 0)
    span = tl.cdiv(tl.cdiv(tl.maximum(seg_len - first, 0), num_splits), BLOCK_N) * BLOCK_N
    start = first + seg_split * span
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
        k_cache, v_cache, table,
        stride_kb, stride_ks, stride_vb, stride_vs, kvh * stride_kh, kvh * stride_vh,
        seg_offset, start, end, q_pos, k_lo, qk_scale,
        offs_d, d_mask, BLOCK_SIZE, BLOCK_N, IEEE,
    )  # fmt: skip
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    res = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = part_o + row64[:, None] * stride_ob + q_head[:, None] * stride_oh + split * stride_os
    tl.store(o_ptrs + offs_d[None, :], res, mask=row_ok[:, None] & d_mask[None, :])
    tl.store(part_lse + row64 * stride_lb + q_head * stride_lh + split, lse, mask=row_ok)

    # One arrival per row written (its head-0 lane); whoever counts a row last merges it.
    total = p_splits + r_splits
    counted = row_ok & (head == 0)
    counters = arrivals + row64 * NUM_KV + kvh
    before = tl.atomic_add(counters, tl.full([BLOCK_M], 1, tl.int32), mask=counted, sem="acq_rel")
    last = (counted & (before == total - 1)).to(tl.int32)
    if tl.max(last, 0) > 0:
        for m in range(0, G_TILE):
            if tl.max(tl.where(member == m, last, 0), 0) > 0:
                r = (b + m).to(tl.int64)
                tl.store(arrivals + r * NUM_KV + kvh, 0)  # for the next layer
                for hh in range(0, QPK):
                    _merge_row(part_o, part_lse, out, r, kvh * QPK + hh, total,
                               stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                               stride_b, stride_h, S_CHUNK, HEAD_DIM, D_PAD)


@triton.jit
def _merge_row(
    part_o, part_lse, out, r, h, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_b, stride_h,
    S_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Row ``r``, head ``h``: the splits' partial outputs weighted by their log-sum-exp."""
    lse_row = part_lse + r * stride_lb + h * stride_lh
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
        o_ptrs = part_o + r * stride_ob + h * stride_oh + splits[:, None] * stride_os
        o = tl.load(o_ptrs + offs_d[None, :], mask=o_mask, other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        den += w
    total = tl.sum(den, 0)
    res = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out + r * stride_b + h * stride_h + offs_d, res, mask=d_mask)


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
    # One scratch set per step, reused by every layer (they run one after another on a stream;
    # each layer's last arrivals reset the counters to zero).
    key = ("triton_decode_partials", batch, num_heads, head_dim, total)
    if key not in meta.scratch:
        meta.scratch[key] = (
            torch.empty((batch, num_heads, total, head_dim), dtype=torch.float32, device=q.device),
            torch.empty((batch, num_heads, total), dtype=torch.float32, device=q.device),
            torch.zeros((batch, num_kv_heads), dtype=torch.int32, device=q.device),
        )
    part_o, part_lse, arrivals = meta.scratch[key]
    g_tile = max(MIN_GROUP_TILE, 16 // qpk_pad)
    _decode_kernel[(batch, num_kv_heads, total)](
        q, q.stride(0), q.stride(1),
        k_cache, v_cache, *k_cache.stride()[:3], *v_cache.stride()[:3],
        ptab, ptab.stride(0), rtab, rtab.stride(0), meta.prompt_lens, meta.response_lens,
        group_start,
        part_o, part_lse, *part_o.stride()[:3], *part_lse.stride()[:2],
        arrivals, out, out.stride(0), out.stride(1),
        p_splits, r_splits, scale * LOG2E, sliding_window or 0, batch,
        HAS_WINDOW=sliding_window is not None,
        NUM_KV=num_kv_heads,
        QPK=qpk,
        QPK_PAD=qpk_pad,
        G_TILE=g_tile,
        BLOCK_M=max(16, g_tile * qpk_pad),
        BLOCK_N=kv_chunk(d_pad, q.dtype),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        IEEE=q.dtype == torch.float32,
        S_CHUNK=16,
        num_warps=num_warps(d_pad, q.dtype),
        num_stages=2,
    )  # fmt: skip
    return out

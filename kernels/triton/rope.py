"""RoPE and the KV-cache write in one kernel.

One program takes one token and a block of heads: query-head blocks rotate q into a new tensor,
kv-head blocks rotate k and store k and v straight into the paged cache, so the rotated k never
makes a round trip through memory. q/k/v may be strided views (splits of the fused QKV output).

Slots < 0 mark padding rows (a CUDA-graph batch padded to its bucket): nothing is stored.

int8 KV seam: ``k_scale``/``v_scale`` (``[num_slots, Hkv]`` float32, one scale per token and head:
the per-layer ``[num_blocks, block_size, Hkv]`` scale pools of kernels/quant.py, flattened)
would switch on ``QUANT_KV``: the kernel would store ``round(x / s)`` with ``s = absmax(x) / 127``
and ``s`` beside it, and attention would dequantize on load. Not implemented yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2

# Heads per program: about 512 rotated elements each, so a decode step still spreads over SMs.
_ELEMS_PER_PROGRAM = 512


@triton.jit
def _tables(cos_row, sin_row, offs, d_mask, dt, HALF):
    """The token's cos/sin halves, rounded to the activation dtype first as the reference does."""
    c1 = tl.load(cos_row + offs, mask=d_mask, other=0.0)
    c2 = tl.load(cos_row + HALF + offs, mask=d_mask, other=0.0)
    s1 = tl.load(sin_row + offs, mask=d_mask, other=0.0)
    s2 = tl.load(sin_row + HALF + offs, mask=d_mask, other=0.0)
    c1, c2 = c1.to(dt).to(tl.float32), c2.to(dt).to(tl.float32)
    s1, s2 = s1.to(dt).to(tl.float32), s2.to(dt).to(tl.float32)
    return c1, s1, c2, s2


@triton.jit
def _rotate(x_row, heads, stride_h, mask, c1, s1, c2, s2, offs, HALF):
    """HF's ``x * cos + rotate_half(x) * sin`` on ``[BLOCK_H, HALF]`` halves, each product and
    the sum rounded to x's dtype as torch rounds op by op."""
    dt = x_row.dtype.element_ty
    ptrs = x_row + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = (x1 * c1[None, :]).to(dt).to(tl.float32)
    b1 = (x2 * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2 * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1 * s2[None, :]).to(dt).to(tl.float32)
    return (a1 - b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def _load_halves(row, heads, stride_h, mask, offs, HALF):
    ptrs = row + heads[:, None] * stride_h + offs[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF, mask=mask, other=0.0)


@triton.jit
def _store_halves(row, heads, stride_h, mask, offs, x1, x2, HALF):
    ptrs = row + heads[:, None] * stride_h + offs[None, :]
    tl.store(ptrs, x1.to(row.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, x2.to(row.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
    q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_sin, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    num_heads, num_kv_heads, num_q_blocks, block_size,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    ROTATE: tl.constexpr, STORE_K: tl.constexpr, WRITE_CACHE: tl.constexpr,
    QUANT_KV: tl.constexpr,
):  # fmt: skip
    tl.static_assert(not QUANT_KV, "int8 KV is a documented seam, not implemented yet")
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs = tl.arange(0, HALF_PAD)
    d_mask = offs < HALF
    dt = q_ptr.dtype.element_ty
    cos_row, sin_row = cos_ptr + t * stride_cos, sin_ptr + t * stride_sin
    if hb < num_q_blocks:  # a block of query heads (there are none without ROTATE)
        if ROTATE:
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (heads < num_heads)[:, None] & d_mask[None, :]
            c1, s1, c2, s2 = _tables(cos_row, sin_row, offs, d_mask, dt, HALF)
            q_row = q_ptr + t * stride_qt
            o1, o2 = _rotate(q_row, heads, stride_qh, mask, c1, s1, c2, s2, offs, HALF)
            _store_halves(q_out_ptr + t * stride_qot, heads, stride_qoh, mask, offs, o1, o2, HALF)
    else:  # a block of kv heads
        heads = (hb - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < num_kv_heads)[:, None] & d_mask[None, :]
        k_row = k_ptr + t * stride_kt
        if ROTATE:
            c1, s1, c2, s2 = _tables(cos_row, sin_row, offs, d_mask, dt, HALF)
            k1, k2 = _rotate(k_row, heads, stride_kh, mask, c1, s1, c2, s2, offs, HALF)
        else:
            k1, k2 = _load_halves(k_row, heads, stride_kh, mask, offs, HALF)
        if STORE_K:
            _store_halves(k_out_ptr + t * stride_kot, heads, stride_koh, mask, offs, k1, k2, HALF)
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                block = slot // block_size
                in_block = slot - block * block_size
                kc_row = k_cache_ptr + block * stride_kcb + in_block * stride_kcs
                vc_row = v_cache_ptr + block * stride_vcb + in_block * stride_vcs
                _store_halves(kc_row, heads, stride_kch, mask, offs, k1, k2, HALF)
                v1, v2 = _load_halves(v_ptr + t * stride_vt, heads, stride_vh, mask, offs, HALF)
                _store_halves(vc_row, heads, stride_vch, mask, offs, v1, v2, HALF)

def _launch(q, k, v, cos, sin, k_out, k_cache, v_cache, slot_mapping) -> None:
    """One launch over every token. ``q``/``cos``/``sin`` None: no rotation (plain KV write);
    ``k_out`` None: rotated k is not kept; ``k_cache`` None: nothing is written to the cache."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    rotate, write, store_k = cos is not None, k_cache is not None, k_out is not None
    # Unused pointer arguments get a valid tensor; their branches are compiled out.
    q_in, q_res = q if q is not None else (k, k)
    num_heads = q_in.shape[1] if q is not None else 0
    for name, x in (("q", q_in), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"rope_write_kv: {name} needs unit stride in head_dim, {x.stride()}")
    half = head_dim // 2
    block_h = min(pow2(max(num_heads, num_kv_heads)), max(_ELEMS_PER_PROGRAM // pow2(half), 1))
    num_q_blocks = triton.cdiv(num_heads, block_h) if q is not None else 0
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_kv_heads, block_h))
    k_out = k_out if k_out is not None else k
    kc, vc = (k_cache, v_cache) if write else (k, v)
    kcs = k_cache.stride()[:3] if write else (0, 0, 0)
    vcs = v_cache.stride()[:3] if write else (0, 0, 0)
    cos, sin = (cos, sin) if rotate else (k, k)
    _rope_kv_kernel[grid](
        q_in, k, v, cos, sin, q_res, k_out, kc, vc, slot_mapping if write else k,
        q_in.stride(0), q_in.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_res.stride(0), q_res.stride(1),
        k_out.stride(0), k_out.stride(1), *kcs, *vcs,
        num_heads, num_kv_heads, num_q_blocks, k_cache.shape[1] if write else 1,
        HALF=half, HALF_PAD=pow2(half), BLOCK_H=block_h,
        ROTATE=rotate, STORE_K=store_k, WRITE_CACHE=write, QUANT_KV=False,
        num_warps=4,
    )  # fmt: skip


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k; store rotated k and v at ``slot_mapping``; return the rotated q."""
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError("rope_write_kv: int8 KV (k_scale/v_scale) is not implemented")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch((q, q_out), k, v, cos, sin, None, k_cache, v_cache, slot_mapping)
    return q_out


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch((q, q_out), k, k, cos, sin, k_out, None, None, None)
    return q_out, k_out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _launch(None, k, v, None, None, None, k_cache, v_cache, slot_mapping)

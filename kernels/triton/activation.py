"""SiLU(gate) * up over the fused ``[gate | up]`` GEMM output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded like torch's two ops: silu in float32 -> dtype, then the product -> dtype.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    shape = gate_up.shape
    gu = gate_up.reshape(-1, shape[-1])
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    inter = shape[-1] // 2
    out = torch.empty((gu.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and inter:
        grid = (gu.shape[0], triton.cdiv(inter, BLOCK))
        _silu_mul_kernel[grid](gu, out, gu.stride(0), out.stride(0), inter, BLOCK=BLOCK)
    return out.view(*shape[:-1], inter)

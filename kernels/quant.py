"""The int8 KV cache format: symmetric abs-max quantization, one float32 scale per (token, head).

A pool with ``kv_dtype = int8`` holds K and V as int8 ``[num_blocks, block_size, Hkv, D]`` and,
beside them, their scales ``[num_blocks, block_size, Hkv]`` float32: ``x ~ q * scale`` with
``scale = absmax(x over D) / 127`` and ``q = round(x / scale)`` in ``[-127, 127]``, so the
round-trip error of every element is at most ``scale / 2``. A head whose values are all zero gets
scale 0 and dequantizes to zeros. Attention dequantizes what it reads (``dequantize``); nothing
outside the kernels sees int8 values.

A (token, head) costs ``D`` bytes + 4 for its scale instead of ``2 * D`` in bf16: 68 / 128 bytes
(0.53x) at ``D = 64``, 132 / 256 (0.52x) at ``D = 128``.
"""

from __future__ import annotations

import torch

KV_DTYPES = ("auto", "int8")
SCALE_DTYPE = torch.float32
QMAX = 127.0


def kv_storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type for a ``kv_dtype`` setting (``auto`` = the model's dtype)."""
    if kv_dtype == "auto":
        return model_dtype
    if kv_dtype == "int8":
        return torch.int8
    raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


def kv_bytes_per_token_head(head_dim: int, storage_dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) costs per KV head: the values, plus the scale for int8."""
    elem = torch.empty((), dtype=storage_dtype).element_size()
    scale = torch.empty((), dtype=SCALE_DTYPE).element_size() if storage_dtype == torch.int8 else 0
    return head_dim * elem + scale


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (int8 ``[..., D]``, float32 scale ``[...]``), symmetric abs-max."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / QMAX
    # A zero row keeps scale 0 (and dequantizes to exact zeros); divide by 1 there instead.
    denom = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / denom.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 ``[..., D]`` and scale ``[...]`` back to ``dtype`` (computed in float32)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)

"""Plain-torch backend: correct and readable, the oracle that every other backend is tested on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import AttentionMetadata, KernelBackend
from .quant import dequantize, quantize


def gather_segment(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one segment, as ``[length, Hkv, D]`` (or ``[length, Hkv]``
    for a scale pool)."""
    if length == 0:
        return cache.new_empty((0, *cache.shape[2:]))
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def gather_context(
    cache: torch.Tensor,
    scale: torch.Tensor | None,
    meta: AttentionMetadata,
    i: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sequence ``i``'s whole context (prompt segment, then response segment) as
    ``[ctx, Hkv, D]`` in ``dtype``, dequantized when the cache is int8."""
    parts = []
    for table, length in (
        (meta.prompt_block_tables[i], meta.prompt_lens_host[i]),
        (meta.response_block_tables[i], meta.response_lens_host[i]),
    ):
        x = gather_segment(cache, table, length)
        if scale is not None:
            x = dequantize(x, gather_segment(scale, table, length), dtype)
        parts.append(x.to(dtype))
    return torch.cat(parts)


def store_kv(
    x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None, slot_mapping: torch.Tensor
) -> None:
    """Write ``x [T, Hkv, D]`` at flat ``slot_mapping``; quantized, with its scales, for int8."""
    flat = cache.view(-1, *cache.shape[2:])
    if scale is None:
        flat[slot_mapping] = x.to(cache.dtype)
        return
    q, s = quantize(x)
    flat[slot_mapping] = q
    scale.view(-1, scale.shape[-1])[slot_mapping] = s


class ReferenceBackend(KernelBackend):
    name = "reference"
    int8_kv = True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Same op order and float32 accumulation as HF's LlamaRMSNorm, so greedy outputs match.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # HF casts the float32 tables to the activation dtype before multiplying; so do we.
        cos = cos.unsqueeze(1).to(q.dtype)
        sin = sin.unsqueeze(1).to(q.dtype)

        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        store_kv(k, k_cache, k_scale, slot_mapping)
        store_kv(v, v_cache, v_scale, slot_mapping)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        for i in range(meta.num_seqs):
            start, end = meta.cu_seqlens_q_host[i], meta.cu_seqlens_q_host[i + 1]
            keys = gather_context(k_cache, k_scale, meta, i)
            values = gather_context(v_cache, v_scale, meta, i)
            ctx_len, q_len = keys.shape[0], end - start
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
            qi = q[start:end].float()
            scores = torch.einsum("qhd,khd->hqk", qi, keys) * scale
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            k_pos = torch.arange(ctx_len, device=q.device)[None, :]
            visible = k_pos <= q_pos
            if sliding_window is not None:
                visible &= k_pos > q_pos - sliding_window
            scores.masked_fill_(~visible, float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
        return out

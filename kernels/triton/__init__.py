"""The ``triton`` backend: every op of ``KernelBackend`` as Triton kernels, written in
``triton.language`` only (no CUDA intrinsics or inline PTX) so Intel's XPU backend compiles them
too. One op family per module: norm, activation, rope (+ KV write), decode_attention,
prefill_attention, cache. Tests run them on CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import torch

from ..interface import AttentionMetadata, KernelBackend
from . import activation, cache, decode_attention, gemv, norm, prefill_attention, rope
from ._common import SUPPORTED_DTYPES

# Shortest split of a decode segment: below this, the merge costs more than the split saves.
DECODE_SPLIT_TOKENS = 256


class TritonBackend(KernelBackend):
    name = "triton"
    # Decode reads only device tensors, launch grids depend on shapes alone, slots < 0 are
    # skipped: decode steps replay as CUDA graphs (actors/decode_graphs.py).
    graphable = True

    def __init__(self, decode_split_tokens: int = DECODE_SPLIT_TOKENS) -> None:
        self.decode_split_tokens = decode_split_tokens

    @staticmethod
    def check_supported(
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        block_size: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """Raise ValueError, naming the op and the shape, for a model these kernels can't run.
        The engine calls it at start, so a bad shape never fails in the middle of serving."""
        shape = (
            f"head_dim={head_dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}, "
            f"dtype={dtype}, block_size={block_size}"
        )
        if kv_dtype == torch.int8:
            raise ValueError(
                "triton backend: the int8 KV cache (kv_dtype=int8) is not implemented yet (its "
                "seam is rope.py's k_scale/v_scale); use kv_dtype 'auto', or the 'cpu' or "
                f"'reference' backend ({shape})"
            )
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"triton backend: no kernels for dtype {dtype} (all ops take float16, bfloat16 "
                f"or float32; {shape})"
            )
        if head_dim % 2:
            raise ValueError(f"triton rope_write_kv: head_dim must be even ({shape})")
        if not 16 <= head_dim <= 256:
            raise ValueError(f"triton attention: head_dim must be in [16, 256] ({shape})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"triton attention: num_heads must be a multiple of num_kv_heads ({shape})"
            )
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"triton attention: block_size must be a power of 2 ({shape})")

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One row in 16/bf16 (the batch-1 decode step): the bandwidth-bound GEMV kernel;
        otherwise cuBLAS, which wins from two rows on. float32 stays on cuBLAS, whose sums HF's
        float32 greedy outputs are compared against."""
        if x.numel() == x.shape[-1] and x.dtype in (torch.float16, torch.bfloat16) \
                and x.device.type != "cpu":
            return gemv.gemv(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return norm.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norm.add_rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return activation.silu_mul(gate_up)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope.rope(q, k, cos, sin)

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
        _no_int8(k_scale, v_scale)
        rope.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def rope_write_kv(
        self,
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
        return rope.rope_write_kv(
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale
        )

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
        """Decode steps (one query per row) run the graph-safe segment decode kernel; every other
        step, mixed ones included, runs the prefill kernel."""
        _no_int8(k_scale, v_scale)
        if meta.is_decode:
            return decode_attention.decode_attention(
                q, k_cache, v_cache, meta, scale, sliding_window, self.decode_split_tokens
            )
        return prefill_attention.prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window)

    def copy_blocks(
        self,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        k_scale_pool: torch.Tensor | None = None,
        v_scale_pool: torch.Tensor | None = None,
    ) -> None:
        _no_int8(k_scale_pool, v_scale_pool)
        cache.copy_blocks(k_pool, v_pool, src, dst)


def _no_int8(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """The int8 seam: scales are part of the signature, but no kernel reads them yet (the engine
    refuses kv_dtype=int8 on this backend at start, in check_supported)."""
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError("triton backend: int8 KV cache (k_scale/v_scale) is not built")


__all__ = ["TritonBackend"]

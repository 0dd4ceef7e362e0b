"""CPU backend (xFasterTransformer's CPU path, docs/architecture.md):

* attention: batched decode and SlimAttention prefill (cpu_attention.py), over a pool of the
  model's dtype or int8 (kernels/quant.py);
* linear layers on weights pre-packed once: bf16 into our own column-block layout for the
  AVX-512 BF16 or AVX2 kernel of cpu_native.py (where one builds: it reads the weights at the
  memory's speed at decode sizes, which oneDNN does not, and AVX2 CPUs have no fast bf16 matmul
  in torch at all), else for oneDNN's brgemm (bf16/fp16; the unpacked path re-lays out every
  weight on every call, so a decode GEMV reads each weight twice);
* element-wise chains (add+RMSNorm, SiLU*mul, RoPE, RoPE+KV write) compiled by Inductor's C++
  backend where that is available and faster (cpu_fused.py), or IPEX's fused ops when it
  imports; in bf16 below those sizes (decode steps), add+RMSNorm, RMSNorm and RoPE+KV write
  are one C++ call each (cpu_native.py), where eager PyTorch spends 5-10 dispatched ops on a
  few thousand elements.

Every op is tested against ``reference`` on random inputs (tests/test_kernels.py,
tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import cpu_fused, cpu_native
from .cpu_attention import decode_attention, mixed_attention, onednn_supports
from .interface import AttentionMetadata
from .reference import ReferenceBackend

logger = logging.getLogger(__name__)

# Dtypes whose linear layers run on pre-packed oneDNN weights. float32 stays on MKL's sgemm, which
# is as fast there and keeps float32 results bit-identical to HF's.
PACKED_DTYPES = (torch.bfloat16, torch.float16)


class CPUBackend(ReferenceBackend):
    name = "cpu"
    int8_kv = True

    def __init__(
        self, fused: str | None = None, pack_weights: bool = True, native: bool = True
    ) -> None:
        """``fused``: ``auto`` (IPEX if it imports, else Inductor where it compiles), ``ipex``,
        ``inductor`` or ``eager`` for the element-wise ops (default: ``$SEGSERVE_CPU_FUSED`` or
        ``auto``); ``pack_weights``: pre-pack linear weights; ``native``: bf16 element-wise
        chains at decode sizes in cpu_native.py's C++ (where it builds)."""
        self.fused = cpu_fused.make_fused_ops(fused)
        self.pack_weights = pack_weights
        self.native_elementwise = native

    def describe(self) -> str:
        packed = "off"
        if self.pack_weights:
            isa = cpu_native.isa()
            packed = f"cpu_native ({isa}), oneDNN" if isa is not None else "oneDNN"
        native = ""
        if self.native_elementwise and cpu_native.load() is not None:
            native = " + native bf16 decode ops"
        return f"cpu (element-wise: {self.fused.name}{native}, packed linear: {packed})"

    # ----- linear layers ---------------------------------------------------------------------
    def pack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        if (self.pack_weights and cpu_native.packable(weight)
                and cpu_native.load() is not None):
            return cpu_native.pack(weight)
        if (
            not self.pack_weights
            or weight.device.type != "cpu"
            or weight.dtype not in PACKED_DTYPES
            or not onednn_supports(weight.dtype)
        ):
            return None
        # batch_size=1: the layout oneDNN picks for a GEMV; it serves prefill's GEMMs as well.
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if cpu_native.is_packed(weight):
            return cpu_native.linear(cpu_native.load(), x, weight, bias)
        if weight.layout != torch._mkldnn:
            return F.linear(x, weight, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return out.view(*lead, out.shape[-1])

    # ----- element-wise ----------------------------------------------------------------------
    def _native(self, x: torch.Tensor, min_compiled_rows: int):
        """The native kernels for bf16 calls below the rows where the compiled chains win (all
        sizes when nothing compiles): at decode sizes one C++ call replaces 5-10 eager ops."""
        if not self.native_elementwise or not cpu_native.elementwise_ok(x):
            return None
        # Tokens, as cpu_fused counts them (a [tokens, heads, dim] query is tokens rows, not
        # tokens * heads: counting heads sent batches of 2-63 to eager RoPE, ~20 ops a layer).
        if x.shape[0] >= min_compiled_rows and self.fused.name != "eager":
            return None
        return cpu_native.load()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        lib = self._native(x, cpu_fused.INDUCTOR_MIN_ROWS)
        if lib is not None and weight.dtype == torch.bfloat16:
            return cpu_native.add_rms_norm(lib, x, None, weight, eps)[0]
        return self.fused.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lib = self._native(x, cpu_fused.INDUCTOR_MIN_ROWS)
        if lib is not None and cpu_native.elementwise_ok(residual, weight):
            return cpu_native.add_rms_norm(lib, x, residual, weight, eps)
        return self.fused.add_rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # one call instead of split, silu, mul and their allocations (~50 us a layer at batch 1)
        lib = self._native(gate_up, cpu_fused.SILU_MUL_MIN_ROWS)
        if lib is not None:
            return cpu_native.silu_mul(lib, gate_up)
        return self.fused.silu_mul(gate_up)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fused.rope(q, k, cos, sin)

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
        lib = self._native(q, cpu_fused.INDUCTOR_MIN_ROWS)
        if (lib is not None and k_scale is None
                and cpu_native.rope_write_kv_ok(q, k, v, k_cache, v_cache, slot_mapping)):
            return cpu_native.rope_write_kv(lib, q, k, v, cos, sin, k_cache, v_cache,
                                            slot_mapping)
        return self.fused.rope_write_kv(
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale
        )

    # ----- attention -------------------------------------------------------------------------
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
        lib = None
        if self.native_elementwise and cpu_native.attention_ok(q, k_cache, meta):
            lib = cpu_native.load()
        if meta.is_decode:
            if lib is not None:
                return cpu_native.decode_attention(lib, q, k_cache, v_cache, meta, scale,
                                                   sliding_window, k_scale, v_scale)
            return decode_attention(
                q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale
            )
        return mixed_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale,
                               lib)

"""The CPU backend's element-wise ops: add+RMSNorm, RMSNorm, SiLU*mul, RoPE, RoPE+KV write.

Three implementations, chosen by ``SEGSERVE_CPU_FUSED`` (``auto`` by default):

* ``eager``: the reference ops, op by op.
* ``inductor``: the same functions compiled by Inductor's C++ backend (``torch.compile``,
  dynamic shapes, one compile per op and dtype). Each chain becomes one vectorized loop, so a
  1k-row add+RMSNorm in bf16 takes ~0.6 ms instead of ~10 ms on this project's 2-core test box;
  but a compiled call costs ~20-30 us of guards and dispatch, more than the eager op at decode
  sizes. So compiled code runs only for calls of at least ``INDUCTOR_MIN_ROWS`` rows (prefill;
  ``SILU_MUL_MIN_ROWS`` for SiLU*mul),
  and only in bf16/fp16: in float32 the eager ops keep results bit-identical to HF's. Without a
  C++ compiler, or if a compile fails, the op stays eager (one warning).
* ``ipex``: ``intel_extension_for_pytorch.llm.functional`` (rms_norm, silu_mul) where it imports;
  RoPE stays eager (HF rounds the tables to the activation dtype first, IPEX's kernel does not).
  IPEX's releases trail torch's, so this path is written against IPEX's documented API but
  untested here (README).

``auto`` picks ``ipex`` when it imports, else ``inductor`` where a C++ compiler exists, else
``eager``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import ReferenceBackend

logger = logging.getLogger(__name__)

CHOICES = ("auto", "eager", "inductor", "ipex")
ENV = "SEGSERVE_CPU_FUSED"
# Rows (tokens) from which a compiled element-wise chain beats eager (bench/offline.py
# --elementwise, TinyLlama shapes, bf16, this 2-core box: eager wins at 1 and 16 rows; at 64
# add+RMSNorm and RoPE gain 1.1-1.2x, SiLU*mul only from 256; 1.4-2.1x at 1k rows).
INDUCTOR_MIN_ROWS = 64
SILU_MUL_MIN_ROWS = 256
COMPILED_DTYPES = (torch.bfloat16, torch.float16)

_REF = ReferenceBackend()


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _REF.rms_norm(x, weight, eps)


def eager_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _REF.add_rms_norm(x, residual, weight, eps)


def eager_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _REF.silu_mul(gate_up)


def eager_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _REF.rope(q, k, cos, sin)


def eager_rope_write_kv(
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
    """RoPE, then K (rotated) and V stored into the pool (quantized for int8); the rotated q.
    Compiled, the store is an in-place update of the pool views Inductor writes in its loop."""
    q, k = _REF.rope(q, k, cos, sin)
    _REF.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@dataclass
class FusedOps:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_write_kv: Callable[..., torch.Tensor]


EAGER = FusedOps("eager", eager_rms_norm, eager_add_rms_norm, eager_silu_mul, eager_rope,
                 eager_rope_write_kv)


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


class _SizeDispatch:
    """Eager below ``min_rows`` rows (or outside ``COMPILED_DTYPES``), Inductor-compiled above;
    falls back to eager for good if compiling or running the compiled code fails."""

    def __init__(self, eager: Callable, min_rows: int) -> None:
        self.eager = eager
        self.min_rows = min_rows
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor, *args):
        if self.failed or x.dtype not in COMPILED_DTYPES or x.shape[0] < self.min_rows:
            return self.eager(x, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        try:
            return self.compiled(x, *args)
        except Exception as e:  # no compiler, unsupported op: never fail a step for speed
            logger.warning("Inductor could not compile %s (%s); it stays eager",
                           self.eager.__name__, str(e)[:200])
            self.failed = True
            return self.eager(x, *args)


def inductor_ops(
    min_rows: int = INDUCTOR_MIN_ROWS, silu_mul_min_rows: int = SILU_MUL_MIN_ROWS
) -> FusedOps:
    return FusedOps(
        "inductor",
        _SizeDispatch(eager_rms_norm, min_rows),
        _SizeDispatch(eager_add_rms_norm, min_rows),
        _SizeDispatch(eager_silu_mul, silu_mul_min_rows),
        _SizeDispatch(eager_rope, min_rows),
        _SizeDispatch(eager_rope_write_kv, min_rows),
    )


def ipex_ops() -> FusedOps:
    """IPEX's fused kernels (raises ImportError where IPEX does not import). Untested here."""
    from intel_extension_for_pytorch.llm import functional as ipex_f

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return ipex_f.rms_norm(x, weight, eps)

    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return ipex_f.rms_norm(residual, weight, eps), residual

    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return ipex_f.silu_mul(gate.contiguous(), up.contiguous())

    return FusedOps("ipex", rms_norm, add_rms_norm, silu_mul, eager_rope, eager_rope_write_kv)


def make_fused_ops(choice: str | None = None) -> FusedOps:
    """The element-wise ops for ``choice`` (default: ``$SEGSERVE_CPU_FUSED`` or ``auto``)."""
    choice = (choice or os.environ.get(ENV) or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice in ("auto", "ipex"):
        try:
            return ipex_ops()
        except ImportError as e:
            if choice == "ipex":
                raise ValueError(f"cpu fused ops 'ipex': intel_extension_for_pytorch does not "
                                 f"import ({e})") from e
    if choice == "eager" or (choice == "auto" and not has_cxx_compiler()):
        return EAGER
    return inductor_ops()

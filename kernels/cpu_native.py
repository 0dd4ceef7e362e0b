"""The CPU backend's native kernels (AVX-512 BF16, built at run time): bf16 linear layers, decode
and prefill attention, and add+RMSNorm / RoPE+KV write at decode sizes; the same kernels in AVX2 +
FMA for CPUs without AVX-512 BF16 (``load`` picks the build for this CPU).

**Linear.** A decode step multiplies a few rows (one per sequence) by every weight, so it is bound
by reading the weights (batch 1) or, on a machine with few cores, by the bf16 multiply rate
(batch 8-16). oneDNN's packed GEMV reaches ~60-70% of ``x.sum()``'s read bandwidth at one row
on this project's test box, because it runs the product as a GEMM. Here the weights are packed
once into ``[N / 64, K / 2, 64, 2]``: each 64-column block is one contiguous stream (which the
hardware prefetcher follows across pages) and each 64-byte line is the ``vdpbf16ps`` operand for
16 columns x 2 k, so a k pair of an input row is broadcast and multiplied with 16 columns at
once, no horizontal sums. Tiles of up to 6 input rows x 64 columns, float32 accumulation, one
round-to-nearest-even to bf16 (as oneDNN). Single-thread CPU time on TinyLlama's shapes:
1.5x oneDNN at 1 row, at the read bandwidth up to 4 rows, 1.15x at 16 rows; from 64 to 2048
rows (prefill) within 3% of oneDNN's packed GEMM, 1 or 2 threads, so there is one layout for
both (each 64-column block, at most K * 128 bytes, stays in L2 while every row tile reads it).

**Decode attention.** One task per (sequence, KV head): its G query heads against its keys read
through both block tables (bf16, or int8 with their scales) once into float buffers, scores 8
keys at a time with one cross-lane sum tree, P V in register tiles, float32 inside; replaces ~15
dispatched ops per layer (1k context, batch 1, 2-core Zen 3: 0.16-0.21 ms a layer).

**Prefill attention (SlimAttention).** One call per sequence: per KV head, K^T and V read once
into float32 panels, then query strips in parallel, each its full score rows in 4 x 3-vector
micro-tiles (at the FMA peak in L1), a plain softmax with a cheaper exp for x <= 0, and P V in
4 x 2-vector tiles over 64-key chunks; see cpu_attention.py for the measurements.

**Element-wise.** add+RMSNorm, RMSNorm, SiLU*mul (with a vectorized exp) and RoPE+KV write for
bf16 calls below the sizes where the Inductor-compiled chains win: one call each, rounding where
the eager ops round.

**AVX2 + FMA build** (CPUs without AVX-512 BF16, such as AMD Zen 2/3, where torch has no fast
bf16 matmul: a 32-token TinyLlama prefill took 3 s in torch there). The same functions and
packed layout. Linear: a 256-bit load is 8 columns x 2 k, split into two float vectors by a
shift and a mask, float32 FMAs; one row streams each 64-column block once (31-32 GB/s on a
2-core Zen 3, its read bandwidth); more rows run 4-row x 16-column tiles over k chunks whose 16
KiB of weights stay in L1 (111-119 GFLOP/s at 16 rows, 144-155 at 64, of a ~190 peak).

add+RMSNorm, SiLU*mul and decode attention are written once (``native/vector_ops.h``) against a
small vector vocabulary each build defines: 16 lanes, or 8 with an exact integer
round-to-nearest-even (no denormal flush) and 2^n as two exponent factors in place of
``scalef``. RoPE+KV write is plain C++ shared by both builds (``native/common.h``).

Built once per machine by ``torch.utils.cpp_extension`` (cached under ``$TORCH_EXTENSIONS_DIR``)
without torch's headers (~5-10 s), called through ctypes on raw pointers; its OpenMP is the
libgomp torch has already loaded (same soname), so it shares torch's thread count and pool.
Where there is no compiler, neither instruction set, the build fails, or
``SEGSERVE_CPU_NATIVE=0``, ``load()`` returns None and the backend keeps oneDNN and the torch
ops (one log line).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "SEGSERVE_CPU_NATIVE"  # "0" turns the kernel off
BLOCK_N = 64  # output columns per packed block

# The C++ (kernels/native/), as one source: common.h, the instruction set's file (its linear
# kernel and vector vocabulary), then vector_ops.h (the other kernels, written once in it).
_NATIVE_DIR = Path(__file__).with_name("native")


def _source(isa_file: str) -> str:
    parts = ("common.h", isa_file, "vector_ops.h")
    return "\n".join((_NATIVE_DIR / name).read_text() for name in parts)


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_avx512_bf16() -> bool:
    flags = _cpu_flags()
    return " avx512_bf16" in flags and " avx512bw" in flags


def cpu_has_avx2_fma() -> bool:
    flags = _cpu_flags()
    return " avx2" in flags and " fma" in flags


_L, _P = ctypes.c_long, ctypes.c_void_p
_SIGNATURES = {
    "segserve_linear_bf16": [_P, _L, _L, _P, _L, _L, _P, _P, _L, ctypes.c_int],
    "segserve_add_rms_norm_bf16": [_P, _L, _P, _L, _P, _P, _P, _L, _L, ctypes.c_float],
    "segserve_silu_mul_bf16": [_P, _L, _L, _L, _P],
    "segserve_rope_write_kv_bf16": [_P, _L, _P, _L, _P, _L, _P, _P, _L, _L, _L, _L, _P, _P,
                                    _P, _P],
    "segserve_decode_attention": [_P, _P, _P, _P, _P, _P, _L, _P, _P, _L, _P, _L, _L, _L, _L,
                                  _L, ctypes.c_float, _L, _P, ctypes.c_int],
    "segserve_prefill_attention": [_P, _P, _P, _P, _P, _P, _L, _P, _L, _L, _L, _L, _L, _L,
                                   ctypes.c_float, _L, _L, _P, ctypes.c_int],
}  # fmt: skip


_FALLBACK = "linear layers use oneDNN or torch"


def _build(name: str, source: str, cflags: list[str], what: str) -> ctypes.CDLL | None:
    """``source`` compiled once per machine as ``name`` and loaded, its functions typed; None
    (logged) where there is no compiler or the build fails."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++") if c):
        logger.warning("%s: no C++ compiler; %s", what, _FALLBACK)
        return None
    try:
        from torch.utils import cpp_extension

        path = cpp_extension.load_inline(
            name, [source], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
            is_python_module=False, no_implicit_headers=True, verbose=False,
        )
        lib = ctypes.CDLL(path if isinstance(path, str) else _built_path(name))
    except Exception as e:  # noqa: BLE001 - a failed build must not stop the engine
        logger.warning("%s did not build (%s); %s", what, str(e)[:300], _FALLBACK)
        return None
    for fn_name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, fn_name)
        fn.restype, fn.argtypes = None, argtypes
    return lib


# The builds, best first: extension name, instruction-set file, compiler flags, CPU check.
BUILDS = {
    "avx512_bf16": ("segserve_cpu_native", "avx512.cpp",
                    ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"],
                    cpu_has_avx512_bf16),
    "avx2": ("segserve_cpu_native_avx2", "avx2.cpp", ["-O3", "-mavx2", "-mfma", "-fopenmp"],
             cpu_has_avx2_fma),
}  # fmt: skip


@functools.cache
def load_build(isa_name: str) -> ctypes.CDLL | None:
    """One build's kernels (a key of ``BUILDS``), compiled, or None where it cannot run here."""
    name, isa_file, cflags, runs_here = BUILDS[isa_name]
    if os.environ.get(ENV, "1") == "0" or not runs_here():
        return None
    return _build(name, _source(isa_file), cflags, f"{isa_name} kernels")


def isa() -> str | None:
    """Which build ``load`` gives: the first of ``BUILDS`` that runs here, or None."""
    return next((k for k in BUILDS if load_build(k) is not None), None)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels for this CPU (AVX-512 BF16, else AVX2 + FMA), or None (logged once)."""
    best = isa()
    if best is None:
        if os.environ.get(ENV, "1") != "0":
            logger.info("native CPU kernels: no AVX-512 BF16 or AVX2 here, or no build; linear "
                        "layers use oneDNN or torch, the element-wise ops torch")  # fmt: skip
        return None
    return load_build(best)


def _built_path(name: str) -> str:
    from torch.utils import cpp_extension

    root = Path(cpp_extension._get_build_directory(name, verbose=False))
    return str(next(root.glob(f"{name}*.so")))


def packable(weight: torch.Tensor) -> bool:
    """Whether ``pack`` takes this weight: bf16 ``[N, K]`` on the CPU, N % 64 == 0, K even."""
    return (
        weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.shape[0] % BLOCK_N == 0
        and weight.shape[1] % 2 == 0
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[N / 64, K / 2, 64, 2]``: each 64-column block one contiguous stream."""
    n, k = weight.shape
    return weight.view(n // BLOCK_N, BLOCK_N, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack`` (a copy), for tools that compare other GEMMs on the same weight."""
    blocks, k2, bn, _ = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(blocks * bn, k2 * 2)


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and weight.shape[2] == BLOCK_N and weight.shape[3] == 2


def linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 ``x`` and ``packed = pack(weight)``."""
    k, n = x.shape[-1], packed.shape[0] * BLOCK_N
    if k != packed.shape[1] * 2:
        raise ValueError(f"linear: input has {k} features, the weight {packed.shape[1] * 2}")
    x2 = _rows2d(x)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if x2.stride(0) % 2:  # rows are read 4 bytes at a time
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()
    lib.segserve_linear_bf16(
        x2.data_ptr(), x2.stride(0), x2.shape[0], packed.data_ptr(), n, k,
        bias.data_ptr() if bias is not None else None, out.data_ptr(), n,
        torch.get_num_threads(),
    )
    return _like(out, x)


# ----- element-wise chains at decode sizes ------------------------------------------------------
# The wrappers below run ~100 times a decode step: a 2-D input is taken as it is and the output
# viewed back only when the input was not 2-D (a reshape or view costs 1.5-4 us, the kernel of an
# add+RMSNorm at batch 1 about 2).
def _rows2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (2-D) in ``x``'s leading shape."""
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def elementwise_ok(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the element-wise kernels take these tensors: bf16 on the CPU."""
    if x.dtype != torch.bfloat16 or not x.is_cpu:
        return False
    return all(t.dtype == torch.bfloat16 and t.is_cpu for t in others)


def add_rms_norm(lib: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` (``residual`` None: ``(rms_norm(x), x)``),
    rounded to bf16 where the reference rounds."""
    x2 = _rows2d(x)
    rows, h = x2.shape
    out = torch.empty(rows, h, dtype=torch.bfloat16)
    weight = weight.contiguous()
    if residual is None:
        lib.segserve_add_rms_norm_bf16(x2.data_ptr(), x2.stride(0), None, 0, weight.data_ptr(),
                                       out.data_ptr(), None, rows, h, eps)
        return _like(out, x), x
    r2 = _rows2d(residual)
    res_out = torch.empty(rows, h, dtype=torch.bfloat16)
    lib.segserve_add_rms_norm_bf16(x2.data_ptr(), x2.stride(0), r2.data_ptr(), r2.stride(0),
                                   weight.data_ptr(), out.data_ptr(), res_out.data_ptr(), rows, h,
                                   eps)
    return _like(out, x), _like(res_out, x)


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` (bf16), rounded where eager rounds."""
    g2 = _rows2d(gate_up)
    rows, width = g2.shape
    if width % 2:
        raise ValueError(f"silu_mul: gate_up has an odd width {width}")
    out = torch.empty(rows, width // 2, dtype=torch.bfloat16)
    lib.segserve_silu_mul_bf16(g2.data_ptr(), g2.stride(0), rows, width // 2, out.data_ptr())
    return _like(out, gate_up)


def rope_write_kv_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """bf16 pools (no int8 scales), heads packed at head_dim stride, contiguous pools."""
    d = q.shape[-1]
    return (
        elementwise_ok(q, k, v, k_cache, v_cache)
        and d % 2 == 0
        and all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v))
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and slot_mapping.dtype == torch.int64
    )


def rope_write_kv(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k (tables rounded to bf16, as HF), k and v stored at their slots (slot < 0:
    padding, not stored); returns the rotated q ``[T, Hq, D]``."""
    rows, hq, d = q.shape
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    slots = slot_mapping.contiguous()
    q_out = torch.empty(rows, hq, d, dtype=torch.bfloat16)
    lib.segserve_rope_write_kv_bf16(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        cos.data_ptr(), sin.data_ptr(), rows, hq, k.shape[1], d, k_cache.data_ptr(),
        v_cache.data_ptr(), slots.data_ptr(), q_out.data_ptr(),
    )
    return q_out


# ----- attention: decode, and SlimAttention's prefill ---------------------------------------------
def attention_ok(q: torch.Tensor, k_cache: torch.Tensor, meta) -> bool:
    """Whether the native decode and prefill attention take these: bf16 queries over a bf16 or
    int8 pool, head_dim a multiple of 16, int32 tables."""
    tables = (meta.prompt_block_tables, meta.prompt_lens, meta.response_block_tables,
              meta.response_lens)
    return (
        q.dtype == torch.bfloat16
        and k_cache.dtype in (torch.bfloat16, torch.int8)
        and q.shape[-1] % 16 == 0
        and k_cache.is_contiguous()
        and all(t.dtype == torch.int32 and t.device.type == "cpu" for t in tables)
    )


def attention_threads(tasks: int) -> int:
    """Threads for ``tasks`` (sequence, KV head) pairs: all of them from two tasks (on the
    2-core Zen 3 two threads won even at batch 1 with 16 keys: 10 against 12 us)."""
    return torch.get_num_threads() if tasks >= 2 else 1


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta, scale: float, sliding_window: int | None,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence (``meta.is_decode``): ``[B, Hq, D]`` bf16, float32 inside."""
    b, hq, d = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    ptab, rtab = meta.prompt_block_tables.contiguous(), meta.response_block_tables.contiguous()
    plen, rlen = meta.prompt_lens.contiguous(), meta.response_lens.contiguous()
    lib.segserve_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_scale.data_ptr() if k_scale is not None else None,
        v_scale.data_ptr() if v_scale is not None else None,
        ptab.data_ptr(), ptab.shape[1], plen.data_ptr(), rtab.data_ptr(), rtab.shape[1],
        rlen.data_ptr(), b, hq, k_cache.shape[2], d, k_cache.shape[1], ctypes.c_float(scale),
        sliding_window or 0, out.data_ptr(), attention_threads(b * k_cache.shape[2]),
    )
    return out


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta, i: int, scale: float,
                      sliding_window: int | None, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None, tokens_per_strip: int,
                      out: torch.Tensor) -> None:
    """Sequence ``i``'s queries ``q`` (its rows, ``[q_len, Hq, D]`` bf16: the last q_len
    positions of its context) against its context, into ``out`` (same shape): SlimAttention's
    strips of ``tokens_per_strip`` queries, float32 inside (``native/vector_ops.h``)."""
    q_len, hq, d = q.shape
    q = q.contiguous()
    ptab = meta.prompt_block_tables[i].contiguous()
    rtab = meta.response_block_tables[i].contiguous()
    lib.segserve_prefill_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_scale.data_ptr() if k_scale is not None else None,
        v_scale.data_ptr() if v_scale is not None else None,
        ptab.data_ptr(), meta.prompt_lens_host[i], rtab.data_ptr(), meta.response_lens_host[i],
        q_len, hq, k_cache.shape[2], d, k_cache.shape[1], ctypes.c_float(scale),
        sliding_window or 0, tokens_per_strip, out.data_ptr(), torch.get_num_threads(),
    )

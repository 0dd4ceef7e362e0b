"""CPU kernel measurements for bench/offline.py (imported by it; not a program of its own):
SlimAttention prefill against torch SDPA and the reference loop, linear layers on plain against
pre-packed oneDNN weights and cpu_native's bf16 kernel, Inductor-compiled element-wise chains
against eager, and KV bytes per token of each kv_dtype. Each figure is the median of interleaved
repeats, so a neighbour's load on a shared machine hits every variant alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segserve.kernels import AttentionMetadata, cpu_fused, cpu_native, get_backend
from segserve.kernels.cpu_attention import onednn_supports, slim_attention
from segserve.kernels.quant import kv_bytes_per_token_head


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def prefill_attention(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      length: int, block_size: int = 16, repeats: int = 5) -> dict[str, float]:
    """One layer's attention for a ``length``-token prompt (no cached prefix), seconds each:
    SlimAttention over the paged pool as the engine runs it (cpu_native's kernel where it
    builds; also over an int8 pool), SlimAttention in torch ops (the path without the kernel),
    torch SDPA (causal, GQA) on dense tensors, and the reference backend's per-sequence loop
    (the CPU backend's prefill before SlimAttention)."""
    torch.manual_seed(0)
    blocks = -(-length // block_size)
    table = torch.randperm(blocks * 2)[:blocks].to(torch.int32)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, length], dtype=torch.int32),
        slot_mapping=torch.zeros(length, dtype=torch.int64),
        prompt_block_tables=table[None], prompt_lens=torch.tensor([length], dtype=torch.int32),
        response_block_tables=torch.zeros(1, 1, dtype=torch.int32),
        response_lens=torch.zeros(1, dtype=torch.int32), max_q_len=length,
        cu_seqlens_q_host=[0, length], prompt_lens_host=[length], response_lens_host=[0])
    q = torch.randn(length, num_heads, head_dim).to(dtype)
    k = torch.randn(length, num_kv_heads, head_dim).to(dtype)
    v = torch.randn(length, num_kv_heads, head_dim).to(dtype)
    shape = (blocks * 2, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    k8, v8 = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    ks, vs = torch.zeros(shape[:3]), torch.zeros(shape[:3])
    slots = (table.long()[:, None] * block_size + torch.arange(block_size)).flatten()[:length]
    ref = get_backend("reference")
    ref.write_kv(k, v, k_cache, v_cache, slots)
    ref.write_kv(k, v, k8, v8, slots, ks, vs)
    scale = head_dim**-0.5
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    lib = cpu_native.load()  # the engine's SlimAttention: native where it builds
    fns = {
        "slim": lambda: slim_attention(q, k_cache, v_cache, meta, scale, lib=lib),
        "slim int8": lambda: slim_attention(q, k8, v8, meta, scale, None, ks, vs, lib=lib),
        "slim torch": lambda: slim_attention(q, k_cache, v_cache, meta, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                       enable_gqa=True),
        "reference": lambda: ref.attention(q, k_cache, v_cache, meta, scale),
    }
    return interleaved(fns, repeats)


def linear_layers(model: torch.nn.Module, rows: int = 1, copies: int = 4,
                  repeats: int = 5) -> list[tuple]:
    """Per distinct linear shape of ``model``: (out, in, then ms and GB/s of plain F.linear,
    oneDNN pre-packed, and cpu_native's packed bf16 kernel) for ``rows`` tokens, cycling
    through ``copies`` weights so none stays in cache. NaN where a variant cannot run."""
    seen, out = set(), []
    lib = cpu_native.load()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(module, "pack"):
            continue
        if weight.layout == torch._mkldnn:
            dense = weight.to_dense()
        elif cpu_native.is_packed(weight):
            dense = cpu_native.unpack(weight)
        else:
            dense = weight
        if dense.dim() != 2 or tuple(dense.shape) in seen:
            continue
        seen.add(tuple(dense.shape))
        plain = [dense.clone() for _ in range(copies)]
        x = torch.randn(rows, dense.shape[1]).to(dense.dtype)
        fns = {"plain": lambda x=x, ws=plain: [F.linear(x, w) for w in ws]}
        if dense.dtype in (torch.bfloat16, torch.float16) and onednn_supports(dense.dtype):
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in plain]
            fns["onednn"] = lambda x=x, ps=packed: [
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in ps]
        if lib is not None and cpu_native.packable(dense):
            ours = [cpu_native.pack(w) for w in plain]
            fns["native"] = lambda x=x, ps=ours: [cpu_native.linear(lib, x, p) for p in ps]
        t = interleaved(fns, repeats)
        nbytes = dense.numel() * dense.element_size()
        row = [dense.shape[0], dense.shape[1]]
        for name in ("plain", "onednn", "native"):
            per = t.get(name, float("nan")) / copies
            row += [per * 1e3, nbytes / per / 1e9]
        out.append(tuple(row))
    return out


def elementwise(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype, rows_list: list[int],
                repeats: int = 50) -> list[tuple]:
    """(op, rows, eager us, Inductor-compiled us) for each element-wise chain of a layer."""
    compiled = cpu_fused.inductor_ops(min_rows=1, silu_mul_min_rows=1)
    eager = cpu_fused.EAGER
    out = []
    for rows in rows_list:
        x, r = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
        w = torch.randn(hidden).to(dtype)
        gu = torch.randn(rows, 2 * intermediate).to(dtype)
        qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
        q = qkv[:, : num_heads * head_dim].view(rows, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
        k = k.view(rows, num_kv_heads, head_dim)
        cos, sin = torch.randn(rows, head_dim), torch.randn(rows, head_dim)
        v = torch.randn(rows, num_kv_heads, head_dim).to(dtype)
        blocks = -(-rows // 16) * 2
        k_pool = torch.zeros(blocks, 16, num_kv_heads, head_dim, dtype=dtype)
        v_pool = torch.zeros_like(k_pool)
        slots = torch.randperm(blocks * 16)[:rows]
        cases = {"add+rms_norm": (x, r, w, 1e-5), "silu*mul": (gu,), "rope": (q, k, cos, sin),
                 "rope+kv write": (q, k, v, cos, sin, k_pool, v_pool, slots)}
        names = {"add+rms_norm": "add_rms_norm", "silu*mul": "silu_mul", "rope": "rope",
                 "rope+kv write": "rope_write_kv"}
        for op, args in cases.items():
            name = names[op]
            t = interleaved({"eager": lambda n=name, a=args: getattr(eager, n)(*a),
                             "inductor": lambda n=name, a=args: getattr(compiled, n)(*a)},
                            repeats)
            out.append((op, rows, t["eager"] * 1e6, t["inductor"] * 1e6))
    return out


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> dict[str, int]:
    """KV bytes one token costs in every layer (K and V), per kv_dtype."""
    per = {"auto": kv_bytes_per_token_head(head_dim, dtype),
           "int8": kv_bytes_per_token_head(head_dim, torch.int8)}
    return {k: 2 * num_layers * num_kv_heads * v for k, v in per.items()}

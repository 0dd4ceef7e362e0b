"""CPU attention: batched decode, and SlimAttention for prefill (xFasterTransformer's CPU path).

**Decode** (one query per sequence): all sequences in one batched product over a padded gather
of both segments; the per-sequence python loop of the reference costs more than the arithmetic at
decode sizes.

**SlimAttention** (every other step: prefill, chunked prefill, recompute, mixed batches). Each
sequence's context is read once through its two block tables (dequantized when the pool is
int8); its queries are split into blocks along the query axis only. A query block computes its
*full* score rows against every key it can see, in one scratch sized to the L2 cache, then a plain
softmax, then the product with V: no online-softmax rescaling, no split along keys. Keys a block
cannot see are never computed: causal blocks stop at their last query's position and sliding
windows start at their first query's window, so causal prefill does half the products of a
dense one. The query heads of a KV head share one product (GQA without repeating K/V). Masks are
applied only to the score columns that can hold hidden keys (the diagonal, and the window's
start).

**Native** (bf16 activations, where cpu_native builds: the CPU backend's default): each sequence
is one C++ call (``native/vector_ops.h``) doing the same split in float32 micro-tiles. Per KV
head its keys are read once into float32 panels (K transposed, V; dequantized for int8); a strip
of queries (their G heads as rows, ``native_strip_tokens``: score rows x context fill half an
L2) computes its full score rows, a plain softmax with a vectorized exp, then P V over key
chunks held in L1. 1k-token TinyLlama prefill, 2-core Zen 3: 32-36 ms against torch SDPA's
55-66 and this module's torch-op path's 58-63.

**Torch ops** (float32 models, or no native build): matmuls in the activation dtype with float32
accumulation inside oneDNN/MKL, scores and probabilities rounded to it, as HF's eager attention
does; in float32 everything is float32. On a CPU where oneDNN has no kernel for that dtype (bf16
without AVX-512: AMD Zen 2/3), torch's fallback multiplies ~20x slower than float32, so this
path computes in float32 there.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from . import cpu_native
from .interface import AttentionMetadata
from .reference import gather_context

# Fallback when the L2 size cannot be read (bytes per core).
_DEFAULT_L2 = 1 << 20


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype``'s matmuls (and packs its weights) on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention's products run in: the activations', unless this CPU has no fast
    matmul for it (then float32)."""
    if dtype in (torch.bfloat16, torch.float16) and not onednn_supports(dtype):
        return torch.float32
    return dtype


@functools.cache
def l2_cache_bytes() -> int:
    """Per-core L2 size from sysfs (Linux), or 1 MiB."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        return _DEFAULT_L2


def query_block(num_heads: int, num_keys: int, elem: int, threads: int) -> int:
    """Query rows per block: the block's score rows of all heads, against the keys a causal
    block sees on average (half the context), fill about one L2 per thread (the heads are split
    over threads); at least 32 rows (smaller GEMMs lose more than the cache saves), at most 256,
    a multiple of 16. At 1k tokens, 32 heads and bf16 on 2 threads: 64 rows."""
    budget = l2_cache_bytes() * max(threads, 1)
    rows = budget // max(num_heads * max(num_keys // 2, 1) * elem, 1)
    return int(min(max(rows // 16 * 16, 32), 256))


def native_strip_tokens(group: int, context: int) -> int:
    """Query tokens per strip of the native SlimAttention: the strip's score rows (tokens x the
    ``group`` heads of a KV head) against the whole context fill half an L2, between 16 and 64
    rows. At 1k tokens, GQA 8 and 512 KiB: 8 tokens."""
    rows = l2_cache_bytes() // 2 // (4 * max(context, 1))
    return max(int(min(max(rows, 16), 64)) // group, 1)


def slim_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_q: int | None = None,
    seqs: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """SlimAttention over both segments of every sequence (see the module doc), or only of the
    rows ``seqs``, written into ``out`` when given; ``block_q`` overrides the L2-sized query
    block. With ``lib`` (cpu_native's kernels) and inputs it takes, each sequence is one native
    call instead (float32 inside, ``native/vector_ops.h``)."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    dtype = matmul_dtype(q.dtype)
    out = torch.empty_like(q) if out is None else out
    cu = meta.cu_seqlens_q_host
    if lib is not None and cpu_native.attention_ok(q, k_cache, meta):
        for i in range(meta.num_seqs) if seqs is None else seqs:
            if cu[i + 1] == cu[i]:
                continue
            context = meta.prompt_lens_host[i] + meta.response_lens_host[i]
            tokens = block_q or native_strip_tokens(group, context)
            rows = out[cu[i]:cu[i + 1]]
            dst = rows if rows.is_contiguous() else torch.empty_like(rows)
            cpu_native.prefill_attention(lib, q[cu[i]:cu[i + 1]], k_cache, v_cache, meta, i,
                                         scale, sliding_window, k_scale, v_scale, tokens, dst)
            if dst is not rows:
                rows.copy_(dst)
        return out
    threads = torch.get_num_threads()
    zero = torch.zeros((), dtype=dtype)  # baddbmm's ignored input (beta=0)
    for i in range(meta.num_seqs) if seqs is None else seqs:
        start, end = cu[i], cu[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        # [Hkv, ctx, D], contiguous per head: the products read plain row-major matrices.
        k_h = gather_context(k_cache, k_scale, meta, i, dtype).transpose(0, 1).contiguous()
        v_h = gather_context(v_cache, v_scale, meta, i, dtype).transpose(0, 1).contiguous()
        ctx = k_h.shape[1]
        # [Hkv, q_len, G, D]: a block of queries times the G heads of a KV head is one
        # contiguous [rows * G, D] matrix, multiplied with that KV head's keys once.
        q_h = q[start:end].view(q_len, num_kv_heads, group, head_dim).transpose(0, 1)
        q_h = q_h.to(dtype).contiguous()
        out_h = out[start:end].view(q_len, num_kv_heads, group, head_dim).transpose(0, 1)
        first = ctx - q_len  # position of the sequence's first query
        bq = block_q or query_block(num_heads, ctx, q_h.element_size(), threads)
        for s in range(0, q_len, bq):
            e = min(s + bq, q_len)
            rows = e - s
            p0 = first + s  # the block's queries are at positions [p0, p0 + rows)
            hi = p0 + rows  # keys [lo, hi) are the only ones any of them sees
            lo = max(0, p0 - sliding_window + 1) if sliding_window is not None else 0
            qb = q_h[:, s:e].reshape(num_kv_heads, rows * group, head_dim)
            scores = torch.baddbmm(  # [Hkv, rows * G, hi - lo], the scale fused into the GEMM
                zero, qb, k_h[:, lo:hi].transpose(1, 2), beta=0.0, alpha=scale
            )
            _mask_block(scores.view(num_kv_heads, rows, group, hi - lo), p0, lo, sliding_window)
            probs = torch.softmax(scores, dim=-1)
            ob = torch.bmm(probs, v_h[:, lo:hi])  # [Hkv, rows * G, D]
            out_h[:, s:e] = ob.view(num_kv_heads, rows, group, head_dim)
    return out


def _mask_block(scores: torch.Tensor, p0: int, lo: int, window: int | None) -> None:
    """Set hidden keys to -inf in a block's scores ``[Hkv, rows, G, cols]`` (queries at
    positions ``p0 + r``, keys at ``lo + c``). Only two column ranges can hold hidden keys: past
    the first query's position (causal) and, with a window, before the last query's window."""
    rows, cols = scores.shape[1], scores.shape[3]
    ranges = [(p0 - lo + 1, cols)]  # causal: key > query for some row
    if window is not None:
        ranges.append((0, min(cols, p0 + rows - window - lo)))  # key <= query - window
    for c0, c1 in ranges:
        c0 = max(c0, 0)
        if c1 <= c0:
            continue
        q_pos = torch.arange(p0, p0 + rows)[:, None]
        k_pos = torch.arange(lo + c0, lo + c1)[None, :]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= k_pos <= q_pos - window
        scores[..., c0:c1].masked_fill_(hidden[:, None, :], float("-inf"))


def mixed_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """A step mixing decode rows with prefill chunks (continuous batching): the decode rows in
    one batched product (``decode_attention`` on their sub-batch), the others by SlimAttention
    (native with ``lib``); a python iteration per decode row would cost more than its
    arithmetic."""
    split = meta.scratch.get("mixed_split")
    if split is None:
        split = meta.scratch["mixed_split"] = _split_decode_rows(meta)
    decode_rows, tokens, sub_meta, other_rows = split
    if sub_meta is None:  # fewer than two decode rows: nothing to batch
        return slim_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale,
                              lib=lib)
    out = torch.empty_like(q)
    if lib is not None:
        out[tokens] = cpu_native.decode_attention(lib, q[tokens], k_cache, v_cache, sub_meta,
                                                  scale, sliding_window, k_scale, v_scale)
    else:
        out[tokens] = decode_attention(
            q[tokens], k_cache, v_cache, sub_meta, scale, sliding_window, k_scale, v_scale
        )
    return slim_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale,
                          seqs=other_rows, out=out, lib=lib)


def _split_decode_rows(meta: AttentionMetadata):
    """(decode rows, their token indices, their sub-batch's metadata or None, other rows)."""
    cu = meta.cu_seqlens_q_host
    decode_rows = [i for i in range(meta.num_seqs) if cu[i + 1] - cu[i] == 1]
    others = [i for i in range(meta.num_seqs) if cu[i + 1] - cu[i] > 1]
    if len(decode_rows) < 2:
        return decode_rows, None, None, others
    rows = torch.tensor(decode_rows)
    tokens = torch.tensor([cu[i] for i in decode_rows])
    n = len(decode_rows)
    sub = AttentionMetadata(
        cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32),
        slot_mapping=meta.slot_mapping[tokens],
        prompt_block_tables=meta.prompt_block_tables[rows],
        prompt_lens=meta.prompt_lens[rows],
        response_block_tables=meta.response_block_tables[rows],
        response_lens=meta.response_lens[rows],
        max_q_len=1,
        cu_seqlens_q_host=list(range(n + 1)),
        prompt_lens_host=[meta.prompt_lens_host[i] for i in decode_rows],
        response_lens_host=[meta.response_lens_host[i] for i in decode_rows],
    )
    return decode_rows, tokens, sub, others


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, all sequences in one batched product.

    Both segments are read through their block tables into one padded ``[B, slots, Hkv, D]``
    view per step (dequantized for an int8 pool); padding slots are masked out.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    step = meta.scratch.get("decode_tables")
    if step is None:
        ptab = meta.prompt_block_tables.long()
        # One table per sequence: its prompt blocks, then its response blocks.
        tables = torch.cat([ptab, meta.response_block_tables.long()], dim=1)
        num_slots = tables.shape[1] * block_size
        step = meta.scratch["decode_tables"] = (tables, ptab.shape[1] * block_size, num_slots)
    tables, prompt_slots, num_slots = step
    mask = meta.scratch.get(("decode_mask", sliding_window))
    if mask is None:
        mask = meta.scratch[("decode_mask", sliding_window)] = _decode_mask(
            meta, prompt_slots, num_slots, sliding_window
        )

    def read(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """[B, Hkv, slots, D] float32."""
        x = cache[tables].view(num_seqs, num_slots, num_kv_heads, head_dim).float()
        if scales is not None:
            x = x * scales[tables].view(num_seqs, num_slots, num_kv_heads, 1)
        return x.transpose(1, 2)

    keys, values = read(k_cache, k_scale), read(v_cache, v_scale)
    group = num_heads // num_kv_heads
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.transpose(2, 3)) * scale  # [B, Hkv, G, slots]
    scores.masked_fill_(mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    # Padding slots may hold anything (the pool is never zeroed): 0 * NaN would poison the sum.
    values = values.masked_fill(mask.view(num_seqs, 1, num_slots, 1), 0.0)
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _decode_mask(
    meta: AttentionMetadata, prompt_slots: int, num_slots: int, sliding_window: int | None
) -> torch.Tensor:
    """``[B, 1, 1, slots]``: True where a slot is padding or outside the window."""
    slot = torch.arange(num_slots)[None, :]
    plen = meta.prompt_lens.long()[:, None]
    rlen = meta.response_lens.long()[:, None]
    in_prompt = slot < prompt_slots
    # Position of the token in each slot: prompt slots count from 0, response slots from plen.
    key_pos = torch.where(in_prompt, slot, plen + slot - prompt_slots)
    valid = torch.where(in_prompt, slot < plen, slot - prompt_slots < rlen)
    if sliding_window is not None:
        valid &= key_pos > plen + rlen - 1 - sliding_window
    return ~valid[:, None, None, :]

"""The CPU backend's own kernels against the ``reference`` backend and hand-computed values:
SlimAttention (prefix 0/17/300, queries 1/64/1000, GQA, sliding windows, both segments), the
int8 KV format (round trip, attention within int8 tolerance, writes and block copies), packed
linear layers and the fused element-wise ops."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from segserve.kernels import AttentionMetadata, cpu_fused, cpu_native, get_backend
from segserve.kernels.cpu import CPUBackend
from segserve.kernels.cpu_attention import slim_attention
from segserve.kernels.quant import dequantize, quantize


@pytest.fixture(params=list(cpu_native.BUILDS))
def native_build(request, monkeypatch):
    """Each native kernel build this CPU runs (AVX-512 machines run the AVX2 one too), made the
    one the CPU backend uses."""
    lib = cpu_native.load_build(request.param)
    if lib is None:
        pytest.skip(f"the {request.param} kernels do not build or run here (CPU or compiler)")
    monkeypatch.setattr(cpu_native, "load", lambda: lib)
    return lib


REF = get_backend("reference")
CPU = get_backend("cpu")
BLOCK = 16


def layout(
    rng: random.Random, seqs: list[tuple[int, int, int]], num_blocks: int
) -> AttentionMetadata:
    """One row per ``(prompt_len, response_len, q_len)``; blocks drawn from a shuffled pool."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    ptabs, rtabs, plens, rlens, cu = [], [], [], [], [0]
    for plen, rlen, q_len in seqs:
        assert q_len <= plen + rlen
        ptabs.append([free.pop() for _ in range(-(-plen // BLOCK))])
        rtabs.append([free.pop() for _ in range(-(-rlen // BLOCK))])
        plens.append(plen)
        rlens.append(rlen)
        cu.append(cu[-1] + q_len)

    def pad(rows):
        width = max(max(len(r) for r in rows), 1)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)

    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        prompt_block_tables=pad(ptabs),
        prompt_lens=torch.tensor(plens, dtype=torch.int32),
        response_block_tables=pad(rtabs),
        response_lens=torch.tensor(rlens, dtype=torch.int32),
        max_q_len=max(s[2] for s in seqs),
        cu_seqlens_q_host=cu,
        prompt_lens_host=plens,
        response_lens_host=rlens,
    )


def written_slots(meta: AttentionMetadata) -> torch.Tensor:
    """Flat slots that hold a token of some segment."""
    slots = []
    for i in range(meta.num_seqs):
        for tab, n in ((meta.prompt_block_tables[i], meta.prompt_lens_host[i]),
                       (meta.response_block_tables[i], meta.response_lens_host[i])):
            slots += [int(tab[t // BLOCK]) * BLOCK + t % BLOCK for t in range(n)]
    return torch.tensor(slots, dtype=torch.long)


def pool(meta: AttentionMetadata, num_blocks: int, kv_heads: int, dim: int, dtype=torch.float32):
    """Random values in every written slot, NaN everywhere else (the pool is never zeroed)."""
    cache = torch.full((num_blocks, BLOCK, kv_heads, dim), float("nan"), dtype=dtype)
    slots = written_slots(meta)
    cache.view(-1, kv_heads, dim)[slots] = torch.randn(len(slots), kv_heads, dim).to(dtype)
    return cache


def int8_pool(cache: torch.Tensor, meta: AttentionMetadata):
    """The int8 pool and its NaN-poisoned scales holding ``cache``'s written slots."""
    q = torch.full(cache.shape, -128, dtype=torch.int8)  # -128 never comes out of quantize
    s = torch.full(cache.shape[:3], float("nan"))
    slots = written_slots(meta)
    qs, ss = quantize(cache.view(-1, *cache.shape[2:])[slots])
    q.view(-1, *cache.shape[2:])[slots] = qs
    s.view(-1, cache.shape[2])[slots] = ss
    return q, s


# ----- SlimAttention ---------------------------------------------------------------------------
SLIM = [(prefix, q_len, window) for prefix in (0, 17, 300) for q_len in (1, 64, 1000)
        for window in (None, 100)]  # fmt: skip


@pytest.mark.parametrize("prefix,q_len,window", SLIM)
def test_slim_attention_matches_reference(prefix, q_len, window):
    """Row 0 computes its queries in its prompt segment (prefill after a cached prefix); row 1
    holds the prefix in its prompt and the queries in its response segment (recompute)."""
    rng = random.Random(prefix * 7 + q_len)
    torch.manual_seed(prefix + q_len)
    heads, kv_heads, dim = 8, 2, 16
    seqs = [(prefix + q_len, 0, q_len), (prefix, q_len, q_len)]
    num_blocks = 2 * (-(-(prefix + q_len) // BLOCK) + 2)
    meta = layout(rng, seqs, num_blocks)
    q = torch.randn(2 * q_len, heads, dim)
    k, v = pool(meta, num_blocks, kv_heads, dim), pool(meta, num_blocks, kv_heads, dim)
    want = REF.attention(q, k, v, meta, 0.3, window)
    torch.testing.assert_close(CPU.attention(q, k, v, meta, 0.3, window), want,
                               rtol=1e-5, atol=1e-5)
    # Small query blocks: many blocks, the mask ranges at every offset.
    got = slim_attention(q, k, v, meta, 0.3, window, block_q=48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


NATIVE_SLIM = [(prefix, q_len, window, heads, dim)
               for prefix, q_len in ((0, 1), (17, 64), (300, 1000), (0, 1000), (300, 1))
               for window in (None, 100) for heads, dim in ((8, 32), (6, 48))]  # fmt: skip


@pytest.mark.parametrize("prefix,q_len,window,heads,dim", NATIVE_SLIM)
def test_native_slim_attention_matches_reference(prefix, q_len, window, heads, dim,
                                                 native_build):
    """The C++ SlimAttention (bf16 queries over a bf16 or int8 pool, float32 inside) against the
    reference in float32 on the same values: prompt-segment and response-segment queries after
    a prefix, GQA 4 and 3 (score rows not a multiple of the tile), head_dim 32 and 48 (a
    half-width tail on AVX-512), default and 5-token strips, NaN in every unwritten slot."""
    rng = random.Random(prefix * 7 + q_len + heads)
    torch.manual_seed(prefix + q_len + dim)
    kv_heads = 2
    seqs = [(prefix + q_len, 0, q_len), (prefix, q_len, q_len)] if prefix else [(q_len, 0, q_len)]
    num_blocks = 2 * (-(-(prefix + q_len) // BLOCK) + 2)
    meta = layout(rng, seqs, num_blocks)
    k = pool(meta, num_blocks, kv_heads, dim, torch.bfloat16)
    v = pool(meta, num_blocks, kv_heads, dim, torch.bfloat16)
    q = torch.randn(len(seqs) * q_len, heads, dim).bfloat16()
    assert cpu_native.attention_ok(q, k, meta)
    scale = dim**-0.5
    want = REF.attention(q.float(), k.float(), v.float(), meta, scale, window)
    for strip in (None, 5):
        got = slim_attention(q, k, v, meta, scale, window, block_q=strip, lib=native_build)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3)
    kq, ks = int8_pool(k.float(), meta)
    vq, vs = int8_pool(v.float(), meta)
    want8 = REF.attention(q.float(), kq, vq, meta, scale, window, ks, vs)
    got8 = slim_attention(q, kq, vq, meta, scale, window, ks, vs, lib=native_build)
    torch.testing.assert_close(got8.float(), want8, rtol=2**-7, atol=1e-3)


def test_slim_attention_bf16_and_mixed_batch():
    """bf16 (products in bf16, as HF eager) within bf16 tolerance, in a mixed batch of prefill
    chunks and decode rows, GQA 4."""
    rng = random.Random(5)
    torch.manual_seed(5)
    seqs = [(40, 0, 40), (30, 9, 1), (5, 60, 33), (1, 0, 1)]
    meta = layout(rng, seqs, 40)
    q = torch.randn(sum(s[2] for s in seqs), 8, 32).bfloat16()
    k = pool(meta, 40, 2, 32, torch.bfloat16)
    v = pool(meta, 40, 2, 32, torch.bfloat16)
    for window in (None, 7):
        want = REF.attention(q, k, v, meta, 0.2, window).float()
        got = CPU.attention(q, k, v, meta, 0.2, window).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_step_batches_its_decode_rows(window):
    """Continuous batching: decode rows of a prefill step go through the batched decode product
    as one sub-batch, the rest through SlimAttention; all of it equals the reference (fp32),
    int8 included."""
    rng = random.Random(9)
    torch.manual_seed(9)
    seqs = [(20, 7, 1), (33, 0, 12), (5, 30, 1), (17, 0, 1), (40, 2, 42), (9, 9, 1)]
    meta = layout(rng, seqs, 64)
    q = torch.randn(sum(s[2] for s in seqs), 8, 16)
    k, v = pool(meta, 64, 2, 16), pool(meta, 64, 2, 16)
    torch.testing.assert_close(CPU.attention(q, k, v, meta, 0.25, window),
                               REF.attention(q, k, v, meta, 0.25, window), rtol=1e-5, atol=1e-5)
    assert len(meta.scratch["mixed_split"][0]) == 4  # the four decode rows, batched
    kq, ks = int8_pool(k, meta)
    vq, vs = int8_pool(v, meta)
    meta.scratch.clear()
    torch.testing.assert_close(CPU.attention(q, kq, vq, meta, 0.25, window, ks, vs),
                               REF.attention(q, kq, vq, meta, 0.25, window, ks, vs),
                               rtol=1e-5, atol=1e-5)


# ----- int8 KV ---------------------------------------------------------------------------------
def test_int8_round_trip_error_is_at_most_half_a_scale():
    torch.manual_seed(0)
    x = torch.randn(500, 4, 64) * torch.logspace(-4, 3, 500)[:, None, None]
    x[7] = 0.0  # an all-zero token: scale 0, exact zeros back
    x[8, 1, 5] = -1e4  # one outlier sets its head's scale
    q, s = quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (500, 4)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    torch.testing.assert_close(s, x.abs().amax(-1) / 127)
    err = (dequantize(q, s, torch.float32) - x).abs()
    assert bool((err <= s.unsqueeze(-1) / 2 * (1 + 1e-5)).all())
    assert bool((dequantize(q, s, torch.float32)[7] == 0).all())
    # the abs-max element itself is exact
    assert dequantize(q, s, torch.float32)[8, 1, 5] == pytest.approx(-1e4, rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_int8_write_kv_stores_values_and_scales(backend):
    torch.manual_seed(1)
    be = get_backend(backend)
    k_cache = torch.zeros(4, BLOCK, 2, 8, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    k_scale, v_scale = torch.zeros(4, BLOCK, 2), torch.zeros(4, BLOCK, 2)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    slots = torch.tensor([5, 37, 63])
    q_rot = be.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, k_scale, v_scale)
    want_q, want_k = REF.rope(q, k, cos, sin)
    torch.testing.assert_close(q_rot, want_q)
    for cache, scale, x in ((k_cache, k_scale, want_k), (v_cache, v_scale, v)):
        flat_q, flat_s = cache.view(-1, 2, 8)[slots], scale.view(-1, 2)[slots]
        back = dequantize(flat_q, flat_s, torch.float32)
        assert bool(((back - x).abs() <= flat_s.unsqueeze(-1) / 2 + 1e-6).all())
        untouched = torch.ones(4 * BLOCK, dtype=torch.bool)
        untouched[slots] = False
        assert bool((cache.view(-1, 2, 8)[untouched] == 0).all())


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("window", [None, 6])
def test_int8_attention_within_int8_tolerance_of_fp32(decode, window):
    """The int8 pool's attention (reference and cpu, decode and SlimAttention) against float32
    attention over the unquantized values; the cpu backend equals the reference on int8."""
    rng = random.Random(11)
    torch.manual_seed(11)
    if decode:
        seqs = [(rng.randint(1, 40), rng.randint(0, 30), 1) for _ in range(6)]
    else:
        seqs = [(50, 0, 50), (20, 25, 10), (3, 40, 43)]
    meta = layout(rng, seqs, 64)
    heads, kv_heads, dim = 8, 2, 32
    k, v = pool(meta, 64, kv_heads, dim), pool(meta, 64, kv_heads, dim)
    kq, ks = int8_pool(k, meta)
    vq, vs = int8_pool(v, meta)
    q = torch.randn(sum(s[2] for s in seqs), heads, dim)
    exact = REF.attention(q, k, v, meta, dim**-0.5, window)
    ref8 = REF.attention(q, kq, vq, meta, dim**-0.5, window, ks, vs)
    cpu8 = CPU.attention(q, kq, vq, meta, dim**-0.5, window, ks, vs)
    torch.testing.assert_close(cpu8, ref8, rtol=1e-5, atol=1e-5)
    # int8 keeps ~2 decimal digits per element; attention averages the errors down.
    rel = (ref8 - exact).norm() / exact.norm()
    assert rel < 1e-2, rel
    torch.testing.assert_close(ref8, exact, rtol=0, atol=3e-2)


@pytest.mark.parametrize("batch", [1, 12])
@pytest.mark.parametrize("heads,dim", [(8, 32), (6, 48)])
@pytest.mark.parametrize("window", [None, 6])
def test_native_decode_attention_matches_reference(window, heads, dim, batch, native_build):
    """The C++ decode attention (bf16 queries over a bf16 or int8 pool, float32 inside) against
    the reference computing in float32 on the same values: GQA 4 and 3 (not a whole PV tile),
    head_dim 32 and 48 (a half-width tail on AVX-512), both segments, an empty response,
    contexts of every length mod 8 (the score blocks), a sliding window, NaN in every
    unwritten slot (never read)."""
    rng = random.Random(5 + batch)
    torch.manual_seed(5)
    seqs = [(rng.randint(1, 40), rng.randint(0, 30), 1) for _ in range(batch - 1)] + [(33, 0, 1)]
    meta = layout(rng, seqs, 64)
    kv_heads = 2
    k = pool(meta, 64, kv_heads, dim, torch.bfloat16)
    v = pool(meta, 64, kv_heads, dim, torch.bfloat16)
    q = torch.randn(len(seqs), heads, dim).bfloat16()
    assert cpu_native.attention_ok(q, k, meta)
    got = CPU.attention(q, k, v, meta, dim**-0.5, window)
    want = REF.attention(q.float(), k.float(), v.float(), meta, dim**-0.5, window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3)
    kq, ks = int8_pool(k.float(), meta)
    vq, vs = int8_pool(v.float(), meta)
    got8 = CPU.attention(q, kq, vq, meta, dim**-0.5, window, ks, vs)
    want8 = REF.attention(q.float(), kq, vq, meta, dim**-0.5, window, ks, vs)
    torch.testing.assert_close(got8.float(), want8, rtol=2**-7, atol=1e-3)


def test_copy_blocks_copies_the_scales_too():
    torch.manual_seed(2)
    k = torch.randint(-127, 128, (3, 10, BLOCK, 2, 8), dtype=torch.int8)
    v = torch.randint(-127, 128, (3, 10, BLOCK, 2, 8), dtype=torch.int8)
    ks, vs = torch.rand(3, 10, BLOCK, 2), torch.rand(3, 10, BLOCK, 2)
    before = [t.clone() for t in (k, v, ks, vs)]
    CPU.copy_blocks(k, v, torch.tensor([4, 7]), torch.tensor([1, 9]), ks, vs)
    rest = [b for b in range(10) if b not in (1, 9)]
    for pool_, orig in zip((k, v, ks, vs), before, strict=True):
        assert torch.equal(pool_[:, [1, 9]], orig[:, [4, 7]])
        assert torch.equal(pool_[:, rest], orig[:, rest])


# ----- linear layers and element-wise ops ------------------------------------------------------
def test_packed_bf16_linear_equals_f_linear():
    if CPU.pack_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16)) is None:
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    torch.manual_seed(3)
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    packed = CPU.pack_linear_weight(w)
    for rows in (1, 5, 70):
        x = torch.randn(rows, 64).bfloat16()
        torch.testing.assert_close(CPU.linear(x, packed, b), F.linear(x, w, b),
                                   rtol=1e-2, atol=1e-2)
    assert CPU.pack_linear_weight(torch.randn(8, 8)) is None  # float32 stays on F.linear




@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 11, 13, 16, 70, 257])
def test_cpu_native_linear_matches_float32_product(rows, native_build):
    """Each bf16 linear kernel (AVX-512 BF16; AVX2 + FMA, which AVX-512 machines run too)
    against the float32 product of the same bf16 values: within one bf16 rounding of the result
    (as F.linear), with and without bias, at odd row counts (every tile remainder) and an odd
    number of input pairs."""
    lib = native_build
    torch.manual_seed(rows)
    for n, k in ((64, 70), (192, 256)):
        w, b = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
        packed = cpu_native.pack(w)
        # [N / 64, K / 2, 64, 2]: element [nb, kk, c, j] is w[nb * 64 + c, 2 * kk + j]
        assert cpu_native.is_packed(packed)
        assert torch.equal(packed.permute(0, 2, 1, 3).reshape(n, k), w)
        assert torch.equal(cpu_native.unpack(packed), w)  # bench/cpu_kernels.py's inverse
        x = torch.randn(rows, k).bfloat16()
        for bias in (None, b):
            want = x.float() @ w.float().t() + (0 if bias is None else bias.float())
            got = cpu_native.linear(lib, x, packed, bias)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            # fp32 accumulation, one rounding to bf16 (half an ulp: 2^-9 relative)
            torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-3)
    # the backend packs for the best kernel here and uses it
    assert cpu_native.is_packed(CPU.pack_linear_weight(w))
    # a 3-D input keeps its leading dims; a non-contiguous one is handled
    x = torch.randn(2, rows, 2 * k).bfloat16()[..., ::2]
    torch.testing.assert_close(CPU.linear(x, packed), F.linear(x, w), rtol=1e-2, atol=1e-2)
    assert not cpu_native.packable(torch.randn(65, 64).bfloat16())  # 64-column blocks only
    assert not cpu_native.packable(torch.randn(64, 64))  # bf16 only


def _elementwise_inputs(rows: int, dtype: torch.dtype):
    torch.manual_seed(rows)
    x, r, w = torch.randn(rows, 48).to(dtype), torch.randn(rows, 48).to(dtype), torch.randn(48)
    w = w.to(dtype)
    gu = torch.randn(rows, 96).to(dtype)
    qkv = torch.randn(rows, 6, 16).to(dtype)
    q, k = qkv[:, :4], qkv[:, 4:]  # strided views, as the model passes them
    cos, sin = torch.randn(rows, 16), torch.randn(rows, 16)
    return x, r, w, gu, q, k, cos, sin


def _check_fused(ops: cpu_fused.FusedOps, rows: int, dtype: torch.dtype, tol: dict) -> None:
    x, r, w, gu, q, k, cos, sin = _elementwise_inputs(rows, dtype)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5), **tol)
    for got, want in zip(ops.add_rms_norm(x, r, w, 1e-5), REF.add_rms_norm(x, r, w, 1e-5),
                         strict=True):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ops.silu_mul(gu), REF.silu_mul(gu), **tol)
    for got, want in zip(ops.rope(q, k, cos, sin), REF.rope(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, **tol)
    # RoPE + KV write into pool views (layer 1 of 2), plain and int8 (compared dequantized).
    v = torch.randn_like(k)
    slots = torch.randperm(8 * BLOCK)[:rows]
    for int8 in (False, True):
        pools = []
        for _ in range(2):
            cache_dtype = torch.int8 if int8 else dtype
            kc = torch.zeros(2, 8, BLOCK, 2, 16, dtype=cache_dtype)
            vc = torch.zeros_like(kc)
            scales = (torch.zeros(2, 8, BLOCK, 2), torch.zeros(2, 8, BLOCK, 2)) if int8 else None
            pools.append((kc, vc, scales))
        outs = []
        for fn, (kc, vc, scales) in zip((ops.rope_write_kv, REF.rope_write_kv), pools,
                                        strict=True):
            extra = (scales[0][1], scales[1][1]) if int8 else ()
            outs.append(fn(q, k, v, cos, sin, kc[1], vc[1], slots, *extra))
        torch.testing.assert_close(outs[0], outs[1], **tol)
        for (kc, vc, scales), (rkc, rvc, rscales) in [pools]:
            pool_tol = tol
            if int8:
                kc = dequantize(kc, scales[0], torch.float32)
                vc = dequantize(vc, scales[1], torch.float32)
                rkc = dequantize(rkc, rscales[0], torch.float32)
                rvc = dequantize(rvc, rscales[1], torch.float32)
                # k's rounding difference, plus half a quantization step on either side
                step = float(torch.maximum(scales[0], rscales[0]).max())
                pool_tol = dict(rtol=0, atol=tol["atol"] + step * 1.01)
            torch.testing.assert_close(kc.float(), rkc.float(), **pool_tol)
            torch.testing.assert_close(vc.float(), rvc.float(), **pool_tol)


def test_eager_fused_ops_are_the_reference():
    _check_fused(cpu_fused.EAGER, 5, torch.float32, dict(rtol=0, atol=0))


def test_inductor_fused_ops_match_reference():
    """Compiled (bf16, >= INDUCTOR_MIN_ROWS rows) within one bf16 rounding of the reference;
    below the threshold, and in float32, the eager ops run (exact)."""
    if not cpu_fused.has_cxx_compiler():
        pytest.skip("no C++ compiler: Inductor's CPU backend cannot build")
    ops = cpu_fused.inductor_ops(min_rows=64, silu_mul_min_rows=64)
    _check_fused(ops, 80, torch.bfloat16, dict(rtol=2e-2, atol=6e-2))
    for op in (ops.add_rms_norm, ops.silu_mul, ops.rope, ops.rope_write_kv):
        assert op.compiled is not None and not op.failed
    _check_fused(ops, 3, torch.bfloat16, dict(rtol=0, atol=0))
    _check_fused(ops, 80, torch.float32, dict(rtol=0, atol=0))


@pytest.mark.parametrize("rows", [1, 5, 20])
def test_native_elementwise_ops_match_reference_in_bf16(rows, native_build):
    """The CPU backend's C++ element-wise chains (bf16, decode sizes; 20 rows runs them on
    threads) against the reference ops: they round where the eager ops round, so only the
    float32 sum in RMSNorm and exp's last bit may differ: within one bf16 ulp. Int8 pools
    and float32 go to the other paths (exact)."""
    backend = CPUBackend(fused="eager")
    x = torch.zeros(rows, 48, dtype=torch.bfloat16)
    assert backend._native(x, cpu_fused.INDUCTOR_MIN_ROWS) is not None
    _check_fused(backend, rows, torch.bfloat16, dict(rtol=2**-7, atol=1e-6))
    _check_fused(backend, rows, torch.float32, dict(rtol=0, atol=0))


def test_native_silu_mul_over_the_whole_bf16_range(native_build):
    """The C++ SiLU*mul (its own vectorized exp) against eager on every finite bf16 gate value,
    +-inf, and odd widths (masked tails). Where the result is a normal float: at most one bf16
    ulp apart and equal on >= 99.9%. vcvtneps2bf16 flushes denormals (as in the other native
    ops), so elsewhere they need only agree within 2^-100. Exact at the extremes (silu(x) -> 0
    below -88, -> x above 88)."""
    lib = native_build
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = bits[torch.isfinite(bits)]
    gate = torch.cat([gate, torch.tensor([float("inf"), -float("inf")], dtype=torch.bfloat16)])
    width = gate.numel() - (gate.numel() % 7) - 7  # rows of 7 * k + 3: a masked tail per row
    for rows, cols in ((1, gate.numel()), (7, width // 7)):
        g = gate[: rows * cols].view(rows, cols)
        up = torch.randn(rows, cols).bfloat16()
        got = cpu_native.silu_mul(lib, torch.cat([g, up], dim=1))
        want = REF.silu_mul(torch.cat([g, up], dim=1))
        assert got.shape == want.shape == (rows, cols)
        assert torch.equal(got.isnan(), want.isnan())
        got, want = got.float().nan_to_num(), want.float().nan_to_num()
        normal = (want.abs() >= 2**-120) & (g.float().abs() >= 2**-100)
        diff = (got - want).abs()[normal]
        assert bool((diff <= want.abs()[normal] * 2**-7).all())
        assert (diff == 0).float().mean() >= 0.999
        assert bool(((got - want).abs()[~normal] <= 2**-100).all())
    far = torch.tensor([[-100.0, -90.0, 90.0, 100.0, 1.0, 1.0, 1.0, 1.0]]).bfloat16()
    got = cpu_native.silu_mul(lib, far)
    assert got[0, :2].eq(0).all() and torch.equal(got[0, 2:], far[0, 2:4])


def test_native_ops_are_chosen_by_tokens_not_heads():
    """A decode batch's query [tokens, heads, dim] takes the native kernels below the compiled
    chains' row count in tokens (as cpu_fused counts), whatever its head count."""
    if cpu_native.load() is None:
        pytest.skip("the native CPU kernels do not build or run here")
    backend = CPUBackend(fused="inductor")
    rows = cpu_fused.INDUCTOR_MIN_ROWS
    q = torch.zeros(rows - 1, 32, 64, dtype=torch.bfloat16)  # 63 tokens x 32 heads
    assert backend._native(q, rows) is not None
    assert backend._native(torch.zeros(rows, 32, 64, dtype=torch.bfloat16), rows) is None


def test_fused_ops_choice_is_validated(monkeypatch):
    monkeypatch.setenv(cpu_fused.ENV, "eager")
    assert cpu_fused.make_fused_ops().name == "eager"
    assert get_backend("cpu").fused.name == "eager"
    with pytest.raises(ValueError, match="SEGSERVE_CPU_FUSED must be one of"):
        cpu_fused.make_fused_ops("fast")


# ----- threads and affinity --------------------------------------------------------------------
def test_core_lists_parse_and_format():
    from segserve.actors.cpu_placement import format_cores, parse_cores

    assert parse_cores("0-3, 8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cores([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_cores([5]) == "5"
    for bad in ("", "a-b", "3-x"):
        with pytest.raises(ValueError, match="SEGSERVE_CPU_CORES"):
            parse_cores(bad)


def test_configure_cpu_sets_threads_and_pins_cores(monkeypatch):
    import os

    from segserve.actors import cpu_placement

    cores = cpu_placement.allowed_cores()
    old = torch.get_num_threads()
    try:
        line = cpu_placement.configure_cpu(None)
        assert torch.get_num_threads() == len(cores)
        assert f"{len(cores)} threads on cores {cpu_placement.format_cores(cores)}" in line
        cpu_placement.configure_cpu(1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(cpu_placement.CORES_ENV, str(cores[-1]))
        line = cpu_placement.configure_cpu(None)
        assert os.sched_getaffinity(0) == {cores[-1]} and torch.get_num_threads() == 1
        assert "pinned by SEGSERVE_CPU_CORES" in line
        monkeypatch.setenv(cpu_placement.CORES_ENV, "100000")
        with pytest.raises(ValueError, match="not available to this process"):
            cpu_placement.configure_cpu(None)
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(old)

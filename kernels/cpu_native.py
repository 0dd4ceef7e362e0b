"""The CPU backend's native kernels (AVX-512 BF16, built at run time): bf16 linear layers, decode
attention, and add+RMSNorm / RoPE+KV write at decode sizes; the same kernels in AVX2 + FMA for
CPUs without AVX-512 BF16 (``load`` picks the build for this CPU).

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
through both block tables (bf16, or int8 with their scales), float32 inside; replaces ~15
dispatched ops per layer.

**Element-wise.** add+RMSNorm, RMSNorm, SiLU*mul (with a vectorized exp) and RoPE+KV write for
bf16 calls below the sizes where the Inductor-compiled chains win: one call each, rounding where
the eager ops round.

**AVX2 + FMA build** (CPUs without AVX-512 BF16, such as AMD Zen 2/3, where torch has no fast
bf16 matmul: a 32-token TinyLlama prefill took 3 s in torch there). The same five functions and
packed layout. Linear: a 256-bit load is 8 columns x 2 k, split into two float vectors by a
shift and a mask, float32 FMAs; one row streams each 64-column block once (31-32 GB/s on a
2-core Zen 3, its read bandwidth); more rows run 4-row x 16-column tiles over k chunks whose 16
KiB of weights stay in L1 (111-119 GFLOP/s at 16 rows, 144-155 at 64, of a ~190 peak). The
element-wise ops and decode attention are the AVX-512 algorithms on 8 lanes, with an exact
integer round-to-nearest-even (no denormal flush) and 2^n as two exponent factors in place of
``scalef``. RoPE+KV write is plain C++ shared by both builds.

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
ATTENTION_PARALLEL_TASKS = 16  # (sequence, KV head) pairs from which decode attention splits

# Scalar helpers and the RoPE+KV write (plain C++, vectorized by the compiler), in both builds.
_COMMON = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline float bf(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t rne(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// HF's rotate-half RoPE with the tables rounded to bf16 first; x [heads, D] at row stride.
static inline void rope_row(const uint16_t* x, const float* c, const float* s, long heads,
                            long D, uint16_t* out) {
    const long half = D / 2;
    for (long h = 0; h < heads; ++h)
        for (long d = 0; d < D; ++d) {
            float v = bf(x[h * D + d]);
            float rot = d < half ? -bf(x[h * D + d + half]) : bf(x[h * D + d - half]);
            float a = bf(rne(v * bf(rne(c[d])))), b = bf(rne(rot * bf(rne(s[d]))));
            out[h * D + d] = rne(a + b);
        }
}

// q_out = rope(q); the pool's slot gets rope(k) and v (slot < 0: padding, nothing written).
extern "C" void segserve_rope_write_kv_bf16(const uint16_t* q, long ldq, const uint16_t* k,
                                            long ldk, const uint16_t* v, long ldv,
                                            const float* cos, const float* sin, long rows,
                                            long Hq, long Hkv, long D, uint16_t* kc,
                                            uint16_t* vc, const int64_t* slots,
                                            uint16_t* q_out) {
    for (long t = 0; t < rows; ++t) {
        rope_row(q + t * ldq, cos + t * D, sin + t * D, Hq, D, q_out + t * Hq * D);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        rope_row(k + t * ldk, cos + t * D, sin + t * D, Hkv, D, kc + slot * Hkv * D);
        __builtin_memcpy(vc + slot * Hkv * D, v + t * ldv, Hkv * D * sizeof(uint16_t));
    }
}
"""

_SOURCE_AVX512 = _COMMON + r"""

// Packed weight: [N / 64][K / 2][64][2] bf16. One 64-wide column block is one contiguous stream
// of K * 128 bytes; each 64-byte line holds 16 columns x 2 consecutive k, the operand layout of
// vdpbf16ps, so a k pair of an input row is broadcast and multiplied with 16 columns at once.
template <int MR>
static inline void tile(const uint16_t* x, long ldx, const uint16_t* wb, long K2,
                        const uint16_t* bias, uint16_t* out, long ldo) {
    __m512 acc[MR][4];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    for (long kk = 0; kk < K2; ++kk) {
        const uint16_t* wk = wb + kk * 128;
        __m512bh wv[4];
        for (int j = 0; j < 4; ++j)
            wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(wk + 32 * j));
        for (int m = 0; m < MR; ++m) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(x + m * ldx + 2 * kk));
            for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xb);
        }
    }
    for (int j = 0; j < 4; ++j) {
        __m512 b = _mm512_setzero_ps();
        if (bias) {
            __m256i h = _mm256_loadu_si256((const __m256i*)(bias + 16 * j));
            b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
        for (int m = 0; m < MR; ++m) {
            __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b));  // round to nearest even
            _mm256_storeu_si256((__m256i*)(out + m * ldo + 16 * j), (__m256i)r);
        }
    }
}

// out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ W^T (+ bias[N]), W packed as above.
extern "C" void segserve_linear_bf16(const uint16_t* x, long ldx, long M, const uint16_t* wp,
                                     long N, long K, const uint16_t* bias, uint16_t* out,
                                     long ldo, int threads) {
    const long K2 = K / 2, blocks = N / 64;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long nb = 0; nb < blocks; ++nb) {
        const uint16_t* wb = wp + nb * K2 * 128;
        const uint16_t* bb = bias ? bias + nb * 64 : nullptr;
        uint16_t* ob = out + nb * 64;
        long m = 0;
        for (; m + 6 <= M; m += 6) tile<6>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo);
        switch (M - m) {
            case 5: tile<5>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo); break;
            case 4: tile<4>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo); break;
            case 3: tile<3>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo); break;
            case 2: tile<2>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo); break;
            case 1: tile<1>(x + m * ldx, ldx, wb, K2, bb, ob + m * ldo, ldo); break;
        }
    }
}

// ----- element-wise chains at decode sizes (bf16), rounding where the eager ops round -----------
// 16 bf16 <-> 16 float, the last chunk of a row masked (n < 16).
static inline __m512 ld16(const uint16_t* p, long n) {
    __m256i h = n >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                        : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void st16(uint16_t* p, __m512 v, long n) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);  // round to nearest even
    if (n >= 16) _mm256_storeu_si256((__m256i*)p, h);
    else _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), h);
}

static inline __m512 round16(__m512 v) {  // v rounded to bf16, as float
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// res_out = x + res (bf16); out = w * bf16(r * rsqrt(mean(r^2) + eps)), as HF's RMSNorm.
// res == nullptr: plain RMSNorm of x (res_out unused).
extern "C" void segserve_add_rms_norm_bf16(const uint16_t* x, long ldx, const uint16_t* res,
                                           long ldr, const uint16_t* w, uint16_t* out,
                                           uint16_t* res_out, long rows, long H, float eps) {
    for (long t = 0; t < rows; ++t) {
        const uint16_t* src = x + t * ldx;
        if (res) {
            for (long i = 0; i < H; i += 16) {
                const long n = H - i;
                __m512 v = _mm512_add_ps(ld16(x + t * ldx + i, n), ld16(res + t * ldr + i, n));
                st16(res_out + t * H + i, v, n);
            }
            src = res_out + t * H;
        }
        __m512 acc = _mm512_setzero_ps();
        for (long i = 0; i < H; i += 16) {
            __m512 r = ld16(src + i, H - i);
            acc = _mm512_fmadd_ps(r, r, acc);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(acc) /
                                                                 (float)H + eps));
        for (long i = 0; i < H; i += 16) {
            const long n = H - i;
            __m512 y = round16(_mm512_mul_ps(ld16(src + i, n), inv));
            st16(out + t * H + i, _mm512_mul_ps(ld16(w + i, n), y), n);
        }
    }
}

// exp(x) to ~1 float ulp: n = round(x / ln2), r = x - n ln2 (two-part ln2, |r| <= 0.35),
// exp(r) by its degree-7 Taylor polynomial, times 2^n (scalef: overflow -> inf, underflow -> 0).
static inline __m512 exp16(__m512 x) {
    // past +-104 the result is inf or 0 anyway; clamping keeps n * ln2 finite (no inf - inf)
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// out[t, :I] = bf16(silu(gate)) * up for gate_up[t] = [gate (I) | up (I)] (row stride ldg),
// rounded where eager's F.silu(gate) * up rounds.
extern "C" void segserve_silu_mul_bf16(const uint16_t* gate_up, long ldg, long rows, long I,
                                       uint16_t* out) {
    #pragma omp parallel for schedule(static) if (rows * I >= 65536)
    for (long t = 0; t < rows; ++t) {
        const uint16_t* g = gate_up + t * ldg;
        for (long i = 0; i < I; i += 16) {
            const long n = I - i;
            const __m512 x = ld16(g + i, n);
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 silu = round16(_mm512_div_ps(x, _mm512_add_ps(one, exp16(
                _mm512_sub_ps(_mm512_setzero_ps(), x)))));
            st16(out + t * I + i, _mm512_mul_ps(silu, ld16(g + I + i, n)), n);
        }
    }
}

// ----- decode attention: one query per sequence, over both segments' blocks ---------------------
static inline __m512 ld_kv(const uint16_t* p) { return ld16(p, 16); }
static inline __m512 ld_kv(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// out[b, h*G + g] = softmax(q . K^T * scale) V over the sequence's keys (prompt blocks, then
// response blocks; a sliding window keeps the last `window`), float32 inside. T: bf16 pool
// (uint16_t, scales null) or int8 (scales per (slot, head)). D % 16 == 0.
template <typename T>
static void decode_attn(const uint16_t* q, const T* kc, const T* vc, const float* ks,
                        const float* vs, const int32_t* ptab, long wp, const int32_t* plen,
                        const int32_t* rtab, long wr, const int32_t* rlen, long B, long Hq,
                        long Hkv, long D, long bs, float scale, long window, uint16_t* out,
                        int threads) {
    const long G = Hq / Hkv;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1)
    for (long task = 0; task < B * Hkv; ++task) {
        const long b = task / Hkv, h = task % Hkv;
        const long P = plen[b], ctx = P + rlen[b];
        const long lo = window > 0 && ctx - window > 0 ? ctx - window : 0;
        const long n = ctx - lo;
        float* sc = new float[G * n + G * D];
        float* acc = sc + G * n;
        const uint16_t* qb = q + (b * Hq + h * G) * D;
        for (long j = lo; j < ctx; ++j) {
            const long slot = j < P ? (long)ptab[b * wp + j / bs] * bs + j % bs
                                    : (long)rtab[b * wr + (j - P) / bs] * bs + (j - P) % bs;
            const T* kr = kc + (slot * Hkv + h) * D;
            const float kscale = ks ? ks[slot * Hkv + h] * scale : scale;
            for (long g = 0; g < G; ++g) {
                __m512 d = _mm512_setzero_ps();
                for (long i = 0; i < D; i += 16)
                    d = _mm512_fmadd_ps(ld16(qb + g * D + i, 16), ld_kv(kr + i), d);
                sc[g * n + j - lo] = _mm512_reduce_add_ps(d) * kscale;
            }
        }
        for (long g = 0; g < G; ++g) {
            float* row = sc + g * n;
            float mx = -__builtin_inff(), sum = 0.0f;
            for (long j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
            for (long j = 0; j < n; ++j) sum += (row[j] = __builtin_expf(row[j] - mx));
            const float inv = 1.0f / sum;
            for (long j = 0; j < n; ++j) row[j] *= inv;
            for (long i = 0; i < D; ++i) acc[g * D + i] = 0.0f;
        }
        for (long j = lo; j < ctx; ++j) {
            const long slot = j < P ? (long)ptab[b * wp + j / bs] * bs + j % bs
                                    : (long)rtab[b * wr + (j - P) / bs] * bs + (j - P) % bs;
            const T* vr = vc + (slot * Hkv + h) * D;
            const float vscale = vs ? vs[slot * Hkv + h] : 1.0f;
            for (long i = 0; i < D; i += 16) {
                const __m512 v = ld_kv(vr + i);
                for (long g = 0; g < G; ++g) {
                    __m512 a = _mm512_loadu_ps(acc + g * D + i);
                    a = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * n + j - lo] * vscale), v, a);
                    _mm512_storeu_ps(acc + g * D + i, a);
                }
            }
        }
        for (long g = 0; g < G; ++g)
            for (long i = 0; i < D; i += 16)
                st16(out + (b * Hq + h * G + g) * D + i, _mm512_loadu_ps(acc + g * D + i), 16);
        delete[] sc;
    }
}

extern "C" void segserve_decode_attention(const uint16_t* q, const void* kc, const void* vc,
                                          const float* ks, const float* vs, const int32_t* ptab,
                                          long wp, const int32_t* plen, const int32_t* rtab,
                                          long wr, const int32_t* rlen, long B, long Hq, long Hkv,
                                          long D, long bs, float scale, long window,
                                          uint16_t* out, int threads) {
    if (ks)
        decode_attn<int8_t>(q, (const int8_t*)kc, (const int8_t*)vc, ks, vs, ptab, wp, plen,
                            rtab, wr, rlen, B, Hq, Hkv, D, bs, scale, window, out, threads);
    else
        decode_attn<uint16_t>(q, (const uint16_t*)kc, (const uint16_t*)vc, ks, vs, ptab, wp,
                              plen, rtab, wr, rlen, B, Hq, Hkv, D, bs, scale, window, out,
                              threads);
}
"""

# The linear layer alone for CPUs with AVX2 and FMA but no AVX-512 BF16 (AMD Zen 2/3, Intel
# before Cooper Lake), where torch's bf16 matmul has no fast path (this project's CI box, a Zen 3:
# 3 s for a 32-token TinyLlama prefill). Same packed layout and signature: a 256-bit load holds 8
# columns x 2 k as 32-bit pairs, so (pair << 16) is the even k's bf16 as float and
# (pair & 0xffff0000) the odd k's; float32 FMAs, one round-to-nearest-even at the end.
_SOURCE_AVX2 = _COMMON + r"""
// acc[MR rows][NV * 8 columns] (row stride 64, float) += x[MR rows][k pairs kc..kc+kn) times the
// block's columns c0..c0+8*NV. x: the rows as float (row stride K). Each k pair's weights are
// converted once and used by every row.
template <int MR, int NV>
static inline void tile(const float* x, long K, const uint16_t* wb, long kc, long kn, int c0,
                        float* acc_buf) {
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_loadu_ps(acc_buf + m * 64 + c0 + 8 * j);
    for (long kk = kc; kk < kc + kn; ++kk) {
        const uint16_t* wk = wb + kk * 128 + 2 * c0;
        __m256 w0[NV], w1[NV];
        for (int j = 0; j < NV; ++j) {
            __m256i p = _mm256_loadu_si256((const __m256i*)(wk + 16 * j));
            w0[j] = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
            w1[j] = _mm256_castsi256_ps(_mm256_and_si256(p, odd));
        }
        for (int m = 0; m < MR; ++m) {
            const __m256 x0 = _mm256_broadcast_ss(x + m * K + 2 * kk);
            const __m256 x1 = _mm256_broadcast_ss(x + m * K + 2 * kk + 1);
            for (int j = 0; j < NV; ++j) {
                acc[m][j] = _mm256_fmadd_ps(w0[j], x0, acc[m][j]);
                acc[m][j] = _mm256_fmadd_ps(w1[j], x1, acc[m][j]);
            }
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc_buf + m * 64 + c0 + 8 * j, acc[m][j]);
}

enum { ROW_GROUP = 64, K_CHUNK = 64 };  // 64 x 64 float partial sums, 16 KiB of weights per chunk

// Rows [0, rows) (rows <= ROW_GROUP) of one 64-column block into acc_buf [rows][64]. One row:
// all 64 columns per k pair (8 accumulators), the block streamed from memory once. More rows:
// 16 columns x up to 4 rows per tile (8 accumulators), over k chunks whose weights (16 KiB) stay
// in L1 while every row tile and column quarter reads them.
static void block_rows(const float* x, long K, const uint16_t* wb, long K2, long rows,
                       float* acc_buf) {
    for (long i = 0; i < rows * 64; ++i) acc_buf[i] = 0.0f;
    if (rows == 1) {
        tile<1, 8>(x, K, wb, 0, K2, 0, acc_buf);
        return;
    }
    for (long kc = 0; kc < K2; kc += K_CHUNK) {
        const long kn = K2 - kc < K_CHUNK ? K2 - kc : K_CHUNK;
        for (int c0 = 0; c0 < 64; c0 += 16) {
            long m = 0;
            for (; m + 4 <= rows; m += 4)
                tile<4, 2>(x + m * K, K, wb, kc, kn, c0, acc_buf + m * 64);
            switch (rows - m) {
                case 3: tile<3, 2>(x + m * K, K, wb, kc, kn, c0, acc_buf + m * 64); break;
                case 2: tile<2, 2>(x + m * K, K, wb, kc, kn, c0, acc_buf + m * 64); break;
                case 1: tile<1, 2>(x + m * K, K, wb, kc, kn, c0, acc_buf + m * 64); break;
            }
        }
    }
}

extern "C" void segserve_linear_bf16(const uint16_t* x, long ldx, long M, const uint16_t* wp,
                                     long N, long K, const uint16_t* bias, uint16_t* out,
                                     long ldo, int threads) {
    const long K2 = K / 2, blocks = N / 64;
    float* xf = (float*)malloc(sizeof(float) * M * K);
    if (!xf) return;
    #pragma omp parallel for schedule(static) num_threads(threads) if (M * K > 65536)
    for (long m = 0; m < M; ++m)
        for (long k = 0; k < K; ++k) xf[m * K + k] = bf(x[m * ldx + k]);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long nb = 0; nb < blocks; ++nb) {
        const uint16_t* wb = wp + nb * K2 * 128;
        float acc[ROW_GROUP * 64];
        for (long r0 = 0; r0 < M; r0 += ROW_GROUP) {
            const long rows = M - r0 < ROW_GROUP ? M - r0 : ROW_GROUP;
            block_rows(xf + r0 * K, K, wb, K2, rows, acc);
            for (long m = 0; m < rows; ++m)
                for (int c = 0; c < 64; ++c) {
                    const float b = bias ? bf(bias[nb * 64 + c]) : 0.0f;
                    out[(r0 + m) * ldo + nb * 64 + c] = rne(acc[m * 64 + c] + b);
                }
        }
    }
    free(xf);
}

// ----- element-wise chains and decode attention: the AVX-512 kernels' algorithms, 8 lanes -------
// 8 bf16 <-> 8 float, the last chunk of a row partial (n < 8). Rounding is exact RNE in integer
// ops (no denormal flush, as torch's own conversion).
static inline __m256 ld8(const uint16_t* p, long n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128((const __m128i*)p);
    } else {
        uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (long i = 0; i < n; ++i) tmp[i] = p[i];
        h = _mm_loadu_si128((const __m128i*)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256i rne8(__m256 v) {  // 8 bf16 bit patterns in the low halves of 32-bit lanes
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, qnan, nan);
}

static inline __m256 round8(__m256 v) {  // v rounded to bf16, as float
    return _mm256_castsi256_ps(_mm256_slli_epi32(rne8(v), 16));
}

static inline void st8(uint16_t* p, __m256 v, long n) {
    const __m256i r = rne8(v);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (n >= 8) {
        _mm_storeu_si128((__m128i*)p, h);
    } else {
        uint16_t tmp[8];
        _mm_storeu_si128((__m128i*)tmp, h);
        for (long i = 0; i < n; ++i) p[i] = tmp[i];
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

extern "C" void segserve_add_rms_norm_bf16(const uint16_t* x, long ldx, const uint16_t* res,
                                           long ldr, const uint16_t* w, uint16_t* out,
                                           uint16_t* res_out, long rows, long H, float eps) {
    for (long t = 0; t < rows; ++t) {
        const uint16_t* src = x + t * ldx;
        if (res) {
            for (long i = 0; i < H; i += 8) {
                const long n = H - i;
                __m256 v = _mm256_add_ps(ld8(x + t * ldx + i, n), ld8(res + t * ldr + i, n));
                st8(res_out + t * H + i, v, n);
            }
            src = res_out + t * H;
        }
        __m256 acc = _mm256_setzero_ps();
        for (long i = 0; i < H; i += 8) {
            __m256 r = ld8(src + i, H - i);
            acc = _mm256_fmadd_ps(r, r, acc);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / __builtin_sqrtf(hsum8(acc) / (float)H + eps));
        for (long i = 0; i < H; i += 8) {
            const long n = H - i;
            __m256 y = round8(_mm256_mul_ps(ld8(src + i, n), inv));
            st8(out + t * H + i, _mm256_mul_ps(ld8(w + i, n), y), n);
        }
    }
}

// 2^n for integer-valued float n in [-150, 150], as two factors inside the normal range.
static inline __m256 pow2(__m256 n) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(f1, f2);
}

// exp(x) as the AVX-512 exp16: clamp to +-104, n = round(x / ln2), two-part ln2, degree-7
// polynomial, times 2^n (overflow -> inf, underflow -> 0 through the two factors).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(104.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(p, pow2(n));
}

extern "C" void segserve_silu_mul_bf16(const uint16_t* gate_up, long ldg, long rows, long I,
                                       uint16_t* out) {
    #pragma omp parallel for schedule(static) if (rows * I >= 65536)
    for (long t = 0; t < rows; ++t) {
        const uint16_t* g = gate_up + t * ldg;
        for (long i = 0; i < I; i += 8) {
            const long n = I - i;
            const __m256 x = ld8(g + i, n);
            const __m256 one = _mm256_set1_ps(1.0f);
            const __m256 silu = round8(_mm256_div_ps(x, _mm256_add_ps(one, exp8(
                _mm256_sub_ps(_mm256_setzero_ps(), x)))));
            st8(out + t * I + i, _mm256_mul_ps(silu, ld8(g + I + i, n)), n);
        }
    }
}

static inline __m256 ld_kv(const uint16_t* p) { return ld8(p, 8); }
static inline __m256 ld_kv(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// The AVX-512 decode_attn with 8 lanes (D % 8 == 0).
template <typename T>
static void decode_attn(const uint16_t* q, const T* kc, const T* vc, const float* ks,
                        const float* vs, const int32_t* ptab, long wp, const int32_t* plen,
                        const int32_t* rtab, long wr, const int32_t* rlen, long B, long Hq,
                        long Hkv, long D, long bs, float scale, long window, uint16_t* out,
                        int threads) {
    const long G = Hq / Hkv;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1)
    for (long task = 0; task < B * Hkv; ++task) {
        const long b = task / Hkv, h = task % Hkv;
        const long P = plen[b], ctx = P + rlen[b];
        const long lo = window > 0 && ctx - window > 0 ? ctx - window : 0;
        const long n = ctx - lo;
        float* sc = new float[G * n + G * D];
        float* acc = sc + G * n;
        const uint16_t* qb = q + (b * Hq + h * G) * D;
        for (long j = lo; j < ctx; ++j) {
            const long slot = j < P ? (long)ptab[b * wp + j / bs] * bs + j % bs
                                    : (long)rtab[b * wr + (j - P) / bs] * bs + (j - P) % bs;
            const T* kr = kc + (slot * Hkv + h) * D;
            const float kscale = ks ? ks[slot * Hkv + h] * scale : scale;
            for (long g = 0; g < G; ++g) {
                __m256 d = _mm256_setzero_ps();
                for (long i = 0; i < D; i += 8)
                    d = _mm256_fmadd_ps(ld8(qb + g * D + i, 8), ld_kv(kr + i), d);
                sc[g * n + j - lo] = hsum8(d) * kscale;
            }
        }
        for (long g = 0; g < G; ++g) {
            float* row = sc + g * n;
            float mx = -__builtin_inff(), sum = 0.0f;
            for (long j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
            for (long j = 0; j < n; ++j) sum += (row[j] = __builtin_expf(row[j] - mx));
            const float inv = 1.0f / sum;
            for (long j = 0; j < n; ++j) row[j] *= inv;
            for (long i = 0; i < D; ++i) acc[g * D + i] = 0.0f;
        }
        for (long j = lo; j < ctx; ++j) {
            const long slot = j < P ? (long)ptab[b * wp + j / bs] * bs + j % bs
                                    : (long)rtab[b * wr + (j - P) / bs] * bs + (j - P) % bs;
            const T* vr = vc + (slot * Hkv + h) * D;
            const float vscale = vs ? vs[slot * Hkv + h] : 1.0f;
            for (long i = 0; i < D; i += 8) {
                const __m256 v = ld_kv(vr + i);
                for (long g = 0; g < G; ++g) {
                    __m256 a = _mm256_loadu_ps(acc + g * D + i);
                    a = _mm256_fmadd_ps(_mm256_set1_ps(sc[g * n + j - lo] * vscale), v, a);
                    _mm256_storeu_ps(acc + g * D + i, a);
                }
            }
        }
        for (long g = 0; g < G; ++g)
            for (long i = 0; i < D; i += 8)
                st8(out + (b * Hq + h * G + g) * D + i, _mm256_loadu_ps(acc + g * D + i), 8);
        delete[] sc;
    }
}

extern "C" void segserve_decode_attention(const uint16_t* q, const void* kc, const void* vc,
                                          const float* ks, const float* vs, const int32_t* ptab,
                                          long wp, const int32_t* plen, const int32_t* rtab,
                                          long wr, const int32_t* rlen, long B, long Hq, long Hkv,
                                          long D, long bs, float scale, long window,
                                          uint16_t* out, int threads) {
    if (ks)
        decode_attn<int8_t>(q, (const int8_t*)kc, (const int8_t*)vc, ks, vs, ptab, wp, plen,
                            rtab, wr, rlen, B, Hq, Hkv, D, bs, scale, window, out, threads);
    else
        decode_attn<uint16_t>(q, (const uint16_t*)kc, (const uint16_t*)vc, ks, vs, ptab, wp,
                              plen, rtab, wr, rlen, B, Hq, Hkv, D, bs, scale, window, out,
                              threads);
}
"""

_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_CFLAGS_AVX2 = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


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
}  # fmt: skip


def _build(name: str, source: str, cflags: list[str], functions: list[str],
           what: str) -> ctypes.CDLL | None:  # fmt: skip
    """``source`` compiled once per machine as ``name`` and loaded, its ``functions`` typed; None
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
    for fn_name in functions:
        fn = getattr(lib, fn_name)
        fn.restype, fn.argtypes = None, _SIGNATURES[fn_name]
    return lib


_FALLBACK = "linear layers use oneDNN or torch"


@functools.cache
def load_avx512() -> ctypes.CDLL | None:
    """Every kernel for AVX-512 BF16, compiled, or None where it cannot run here."""
    if os.environ.get(ENV, "1") == "0" or not cpu_has_avx512_bf16():
        return None
    return _build("segserve_cpu_native", _SOURCE_AVX512, _CFLAGS, list(_SIGNATURES),
                  "AVX-512 BF16 kernels")  # fmt: skip


@functools.cache
def load_avx2() -> ctypes.CDLL | None:
    """Every kernel for AVX2 + FMA, compiled, or None where it cannot run here."""
    if os.environ.get(ENV, "1") == "0" or not cpu_has_avx2_fma():
        return None
    return _build("segserve_cpu_native_avx2", _SOURCE_AVX2, _CFLAGS_AVX2, list(_SIGNATURES),
                  "AVX2 kernels")  # fmt: skip


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels for this CPU (AVX-512 BF16, else AVX2 + FMA), or None (logged once)."""
    lib = load_avx512() or load_avx2()
    if lib is None and os.environ.get(ENV, "1") != "0":
        logger.info("native CPU kernels: no AVX-512 BF16 or AVX2 here, or no build; linear "
                    "layers use oneDNN or torch, the element-wise ops torch")  # fmt: skip
    return lib


def isa() -> str | None:
    """Which kernels ``load`` gives: "avx512_bf16", "avx2" or None."""
    if load_avx512() is not None:
        return "avx512_bf16"
    return "avx2" if load_avx2() is not None else None


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
    lead, k = x.shape[:-1], x.shape[-1]
    n = packed.shape[0] * BLOCK_N
    if k != packed.shape[1] * 2:
        raise ValueError(f"linear: input has {k} features, the weight {packed.shape[1] * 2}")
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if x2.stride(-1) != 1 or x2.stride(0) % 2:  # rows are read 4 bytes at a time
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()
    lib.segserve_linear_bf16(
        x2.data_ptr(), x2.stride(0), x2.shape[0], packed.data_ptr(), n, k,
        bias.data_ptr() if bias is not None else None, out.data_ptr(), n,
        torch.get_num_threads(),
    )
    return out.view(*lead, n)


# ----- element-wise chains at decode sizes ------------------------------------------------------
def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def elementwise_ok(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the element-wise kernels take these tensors: bf16 on the CPU."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (x, *others))


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
                                       out.data_ptr(), None, rows, h, ctypes.c_float(eps))
        return out.view(x.shape), x
    r2 = _rows2d(residual)
    res_out = torch.empty(rows, h, dtype=torch.bfloat16)
    lib.segserve_add_rms_norm_bf16(x2.data_ptr(), x2.stride(0), r2.data_ptr(), r2.stride(0),
                                   weight.data_ptr(), out.data_ptr(), res_out.data_ptr(), rows, h,
                                   ctypes.c_float(eps))
    return out.view(x.shape), res_out.view(x.shape)


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` (bf16), rounded where eager rounds."""
    g2 = _rows2d(gate_up)
    rows, width = g2.shape
    if width % 2:
        raise ValueError(f"silu_mul: gate_up has an odd width {width}")
    out = torch.empty(rows, width // 2, dtype=torch.bfloat16)
    lib.segserve_silu_mul_bf16(g2.data_ptr(), g2.stride(0), rows, width // 2, out.data_ptr())
    return out.view(*gate_up.shape[:-1], width // 2)


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


# ----- decode attention ---------------------------------------------------------------------------
def decode_attention_ok(q: torch.Tensor, k_cache: torch.Tensor, meta) -> bool:
    """bf16 queries over a bf16 or int8 pool, head_dim a multiple of 16, int32 tables."""
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
    """Threads for ``tasks`` (sequence, KV head) pairs: one below a batch's worth of work,
    where a parallel region's start costs more than the split saves."""
    return torch.get_num_threads() if tasks >= ATTENTION_PARALLEL_TASKS else 1


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

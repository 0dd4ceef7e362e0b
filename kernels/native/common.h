// segserve's native CPU kernels, shared part (kernels/cpu_native.py builds it in front of
// avx512.cpp or avx2.cpp): bf16 <-> float helpers, the RoPE+KV write (plain C++ that the
// compiler vectorizes for either instruction set) and the 8-vector lane-sum tree.
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

// out[0..8) = the lane sums of eight 8-float vectors, by a tree of horizontal adds (no reduction
// per vector); both builds' vsum8 end here (AVX-512 implies AVX2).
static inline void sum8_m256(const __m256* a, float* out) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    // each 128-bit half holds the four vectors' sums over that half's lanes
    const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
}

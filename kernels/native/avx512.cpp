// segserve's native CPU kernels for AVX-512 BF16 (kernels/cpu_native.py: why, and the measured
// speeds). Built after common.h, before vector_ops.h.

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

// ----- the vector vocabulary vector_ops.h is written in: 16 float lanes -------------------------
typedef __m512 vf;
enum { VW = 16 };
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
static inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vloadf(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstoref(float* p, vf v) { _mm512_storeu_ps(p, v); }
// 2^n as float from big = n + 1.5 * 2^23 (vexp_nonpositive): n is big's low mantissa bits.
static inline vf vpow2_bits(vf big) {
    const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(big), _mm512_set1_epi32(0x4b400000));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
}
// out[0..8) = the lane sums of a[0..8): halves added to 8 lanes, then common.h's tree.
static inline void vsum8(const __m512* a, float* out) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
    sum8_m256(h, out);
}
static inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf vrint(vf x) {  // to the nearest integer
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n

// 16 bf16 <-> 16 float, the last chunk of a row masked (n < 16). vcvtneps2bf16 rounds to
// nearest even and flushes denormals.
static inline vf vload(const uint16_t* p, long n) {
    __m256i h = n >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                        : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void vstore(uint16_t* p, vf v, long n) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    if (n >= 16) _mm256_storeu_si256((__m256i*)p, h);
    else _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), h);
}

static inline vf vround(vf v) {  // v rounded to bf16, as float
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline vf ld_kv(const uint16_t* p) { return vload(p, 16); }
static inline vf ld_kv(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

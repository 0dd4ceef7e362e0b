// segserve's native CPU kernels for AVX2 + FMA, for CPUs without AVX-512 BF16 (AMD Zen 2/3,
// Intel before Cooper Lake), where torch's bf16 matmul has no fast path. The same functions and
// packed layout as avx512.cpp. Linear: a 256-bit load holds 8 columns x 2 k as 32-bit pairs, so
// (pair << 16) is the even k's bf16 as float and (pair & 0xffff0000) the odd k's; float32 FMAs,
// one round-to-nearest-even at the end. Built after common.h, before vector_ops.h.

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

// ----- the vector vocabulary vector_ops.h is written in: 8 float lanes --------------------------
typedef __m256 vf;
enum { VW = 8 };
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c
static inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
static inline vf vloadf(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstoref(float* p, vf v) { _mm256_storeu_ps(p, v); }
// 2^n as float from big = n + 1.5 * 2^23 (vexp_nonpositive): n is big's low mantissa bits.
static inline vf vpow2_bits(vf big) {
    const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(big), _mm256_set1_epi32(0x4b400000));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
// out[0..8) = the lane sums of a[0..8) (common.h's tree).
static inline void vsum8(const __m256* a, float* out) { sum8_m256(a, out); }
static inline float vhmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vrint(vf x) {  // to the nearest integer
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for integer-valued n in [-150, 150] (vexp's range): no scalef, so 2^n as two
// exponent-field factors, each inside the normal range.
static inline vf vscale2(vf p, vf n) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const vf f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const vf f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(p, _mm256_mul_ps(f1, f2));
}

// 8 bf16 <-> 8 float, the last chunk of a row partial (n < 8). Rounding is exact RNE in integer
// ops (no denormal flush, as torch's own conversion).
static inline vf vload(const uint16_t* p, long n) {
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

static inline __m256i rne8(vf v) {  // 8 bf16 bit patterns in the low halves of 32-bit lanes
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, qnan, nan);
}

static inline vf vround(vf v) {  // v rounded to bf16, as float
    return _mm256_castsi256_ps(_mm256_slli_epi32(rne8(v), 16));
}

static inline void vstore(uint16_t* p, vf v, long n) {
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

static inline vf ld_kv(const uint16_t* p) { return vload(p, 8); }
static inline vf ld_kv(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

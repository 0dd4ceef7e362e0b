// segserve's native CPU kernels for AVX2 + FMA, for CPUs without AVX-512 BF16 (AMD Zen 2/3,
// Intel before Cooper Lake), where torch's bf16 matmul has no fast path. The same functions and
// packed layout as avx512.cpp. Linear: a 256-bit load holds 8 columns x 2 k as 32-bit pairs, so
// (pair << 16) is the even k's bf16 as float and (pair & 0xffff0000) the odd k's; float32 FMAs,
// one round-to-nearest-even at the end. Built after common.h.

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

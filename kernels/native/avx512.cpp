// segserve's native CPU kernels for AVX-512 BF16 (kernels/cpu_native.py: why, and the measured
// speeds). Built after common.h.


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

// segserve's native CPU kernels written once for both instruction sets: add+RMSNorm, SiLU*mul
// and decode attention, in the vector vocabulary (vf, VW, vload/vstore/vround, vfma, ...) that
// avx512.cpp or avx2.cpp defines just before this file. bf16 in and out, float32 inside,
// rounding where the eager ops round.

// res_out = x + res (bf16); out = w * bf16(r * rsqrt(mean(r^2) + eps)), as HF's RMSNorm.
// res == nullptr: plain RMSNorm of x (res_out unused).
extern "C" void segserve_add_rms_norm_bf16(const uint16_t* x, long ldx, const uint16_t* res,
                                           long ldr, const uint16_t* w, uint16_t* out,
                                           uint16_t* res_out, long rows, long H, float eps) {
    for (long t = 0; t < rows; ++t) {
        const uint16_t* src = x + t * ldx;
        if (res) {
            for (long i = 0; i < H; i += VW) {
                const long n = H - i;
                vf v = vadd(vload(x + t * ldx + i, n), vload(res + t * ldr + i, n));
                vstore(res_out + t * H + i, v, n);
            }
            src = res_out + t * H;
        }
        vf acc = vzero();
        for (long i = 0; i < H; i += VW) {
            vf r = vload(src + i, H - i);
            acc = vfma(r, r, acc);
        }
        const vf inv = vset1(1.0f / __builtin_sqrtf(vsum(acc) / (float)H + eps));
        for (long i = 0; i < H; i += VW) {
            const long n = H - i;
            vf y = vround(vmul(vload(src + i, n), inv));
            vstore(out + t * H + i, vmul(vload(w + i, n), y), n);
        }
    }
}

// exp(x) to ~1 float ulp: n = round(x / ln2), r = x - n ln2 (two-part ln2, |r| <= 0.35),
// exp(r) by its degree-7 Taylor polynomial, times 2^n (overflow -> inf, underflow -> 0).
static inline vf vexp(vf x) {
    // past +-104 the result is inf or 0 anyway; clamping keeps n * ln2 finite (no inf - inf)
    x = vmin(vmax(x, vset1(-104.0f)), vset1(104.0f));
    const vf n = vrint(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnma(n, vset1(0.693145751953125f), x);
    r = vfnma(n, vset1(1.428606765330187045e-06f), r);
    vf p = vset1(1.0f / 5040);
    p = vfma(p, r, vset1(1.0f / 720));
    p = vfma(p, r, vset1(1.0f / 120));
    p = vfma(p, r, vset1(1.0f / 24));
    p = vfma(p, r, vset1(1.0f / 6));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vscale2(p, n);
}

// out[t, :I] = bf16(silu(gate)) * up for gate_up[t] = [gate (I) | up (I)] (row stride ldg),
// rounded where eager's F.silu(gate) * up rounds.
extern "C" void segserve_silu_mul_bf16(const uint16_t* gate_up, long ldg, long rows, long I,
                                       uint16_t* out) {
    #pragma omp parallel for schedule(static) if (rows * I >= 65536)
    for (long t = 0; t < rows; ++t) {
        const uint16_t* g = gate_up + t * ldg;
        for (long i = 0; i < I; i += VW) {
            const long n = I - i;
            const vf x = vload(g + i, n);
            const vf silu = vround(vdiv(x, vadd(vset1(1.0f), vexp(vsub(vzero(), x)))));
            vstore(out + t * I + i, vmul(silu, vload(g + I + i, n)), n);
        }
    }
}

// ----- decode attention: one query per sequence, over both segments' blocks ---------------------
// out[b, h*G + g] = softmax(q . K^T * scale) V over the sequence's keys (prompt blocks, then
// response blocks; a sliding window keeps the last `window`), float32 inside. T: bf16 pool
// (uint16_t, scales null) or int8 (scales per (slot, head)). D % VW == 0.
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
                vf d = vzero();
                for (long i = 0; i < D; i += VW)
                    d = vfma(vload(qb + g * D + i, VW), ld_kv(kr + i), d);
                sc[g * n + j - lo] = vsum(d) * kscale;
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
            for (long i = 0; i < D; i += VW) {
                const vf v = ld_kv(vr + i);
                for (long g = 0; g < G; ++g) {
                    vf a = vloadf(acc + g * D + i);
                    a = vfma(vset1(sc[g * n + j - lo] * vscale), v, a);
                    vstoref(acc + g * D + i, a);
                }
            }
        }
        for (long g = 0; g < G; ++g)
            for (long i = 0; i < D; i += VW)
                vstore(out + (b * Hq + h * G + g) * D + i, vloadf(acc + g * D + i), VW);
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

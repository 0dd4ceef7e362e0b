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

// ----- attention over the paged pool ------------------------------------------------------------
// f(j, slot) for the context positions lo + j in [lo, ctx): the prompt segment's P positions
// through ptab, then the response segment's through rtab; one division per block, not per key.
template <typename F>
static inline void for_each_slot(const int32_t* ptab, long P, const int32_t* rtab, long ctx,
                                 long lo, long bs, F f) {
    for (long pos = lo; pos < ctx;) {
        const bool prompt = pos < P;
        const long seg_pos = prompt ? pos : pos - P, seg_end = prompt ? P : ctx - P;
        const long off = seg_pos % bs;
        const long run = bs - off < seg_end - seg_pos ? bs - off : seg_end - seg_pos;
        const long base = (long)(prompt ? ptab : rtab)[seg_pos / bs] * bs + off;
        for (long r = 0; r < run; ++r) f(pos - lo + r, base + r);
        pos += run;
    }
}

// ----- prefill attention (SlimAttention): one sequence's queries against its whole context ------
// The queries are the sequence's last q_len positions (a prompt, a chunk of one, a recompute);
// the keys are read through both block tables. Per KV head, its keys are read once into float32
// panels: K transposed ([D][keys], so a score tile's columns are vector lanes) and V ([keys][D]),
// dequantized for int8 and zero-padded to whole tiles. Then query strips run in parallel: a strip
// is tq tokens x the G query heads of the KV head (its score rows, one contiguous block of q). A
// strip computes its full score rows against every key it can see in one scratch (L2-sized by
// the caller's tq), a plain softmax per row (no online rescaling), then P V, normalized at the
// end. Keys a strip cannot see are never multiplied: its columns stop at its last query and start
// at its first query's window. float32 throughout, the output rounded to bf16 once.

enum { QK_MR = 4, QK_NR = 3 * VW, PV_MR = 4, PV_KEYS = 64 };

// exp(x) for x <= 0 (softmax's shifted scores) to ~3e-6 relative: x clamped at -87 (exp(-87) is
// below 1e-37: nothing next to the row's max term, 1); n = round(x / ln2) by the 1.5 * 2^23
// trick, whose low mantissa bits are also n's integer for the exponent field; exp(r) by its
// degree-5 Taylor polynomial (|r| <= 0.35); 2^n one normal factor, since n >= -126.
static inline vf vexp_nonpositive(vf x) {
    x = vmax(x, vset1(-87.0f));
    const vf magic = vset1(12582912.0f);  // 1.5 * 2^23
    const vf big = vfma(x, vset1(1.44269504088896341f), magic);
    const vf n = vsub(big, magic);
    vf r = vfnma(n, vset1(0.693145751953125f), x);
    r = vfnma(n, vset1(1.428606765330187045e-06f), r);
    vf p = vset1(1.0f / 120);
    p = vfma(p, r, vset1(1.0f / 24));
    p = vfma(p, r, vset1(1.0f / 6));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vmul(p, vpow2_bits(big));
}


// s[QK_MR][QK_NR] (row stride lds) = q[QK_MR][D] (float, scaled) x kt[D][QK_NR] (row stride
// ldk). The K tile (D x QK_NR floats) stays in L1 while every row tile of the strip reads it.
static inline void qk_tile(const float* q, long D, const float* kt, long ldk, float* s,
                           long lds) {
    vf acc[QK_MR][3];
    for (int m = 0; m < QK_MR; ++m)
        for (int j = 0; j < 3; ++j) acc[m][j] = vzero();
    for (long d = 0; d < D; ++d) {
        const float* kr = kt + d * ldk;
        const vf k0 = vloadf(kr), k1 = vloadf(kr + VW), k2 = vloadf(kr + 2 * VW);
        for (int m = 0; m < QK_MR; ++m) {
            const vf qm = vset1(q[m * D + d]);
            acc[m][0] = vfma(qm, k0, acc[m][0]);
            acc[m][1] = vfma(qm, k1, acc[m][1]);
            acc[m][2] = vfma(qm, k2, acc[m][2]);
        }
    }
    for (int m = 0; m < QK_MR; ++m)
        for (int j = 0; j < 3; ++j) vstoref(s + m * lds + j * VW, acc[m][j]);
}

// o[PV_MR][NV * VW] (row stride D) += p[PV_MR][j0..j1) (row stride ldp) x v[j0..j1)[c0..]
// (row stride D): each V vector load feeds PV_MR FMAs.
template <int NV>
static inline void pv_tile(const float* p, long ldp, const float* v, long D, long j0, long j1,
                           long c0, float* o) {
    vf acc[PV_MR][NV];
    for (int m = 0; m < PV_MR; ++m)
        for (int c = 0; c < NV; ++c) acc[m][c] = vloadf(o + m * D + c0 + c * VW);
    for (long j = j0; j < j1; ++j) {
        vf vv[NV];
        for (int c = 0; c < NV; ++c) vv[c] = vloadf(v + j * D + c0 + c * VW);
        for (int m = 0; m < PV_MR; ++m) {
            const vf pm = vset1(p[m * ldp + j]);
            for (int c = 0; c < NV; ++c) acc[m][c] = vfma(pm, vv[c], acc[m][c]);
        }
    }
    for (int m = 0; m < PV_MR; ++m)
        for (int c = 0; c < NV; ++c) vstoref(o + m * D + c0 + c * VW, acc[m][c]);
}

static inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

template <typename T>
static void prefill_attn(const uint16_t* q, const T* kc, const T* vc, const float* ks,
                         const float* vs, const int32_t* ptab, long P, const int32_t* rtab,
                         long R, long q_len, long Hq, long Hkv, long D, long bs, float scale,
                         long window, long tq, uint16_t* out, int threads) {
    const long G = Hq / Hkv, ctx = P + R, first = ctx - q_len;
    // keys [k0, ctx): the first query's window starts at k0
    const long k0 = window > 0 && first - window + 1 > 0 ? first - window + 1 : 0;
    const long nk = ctx - k0, ldk = round_up(nk, QK_NR) + QK_NR;
    const long strips = (q_len + tq - 1) / tq;
    const long rows_max = round_up(tq * G, QK_MR > PV_MR ? QK_MR : PV_MR);
    float* kt = (float*)malloc(sizeof(float) * (D * ldk + nk * D));
    if (!kt) return;
    float* vp = kt + D * ldk;
    for (long h = 0; h < Hkv; ++h) {
        #pragma omp parallel num_threads(threads) if(threads > 1)
        {
            #pragma omp for schedule(static)
            for (long j = nk; j < ldk; ++j)  // padding columns: finite zeros
                for (long d = 0; d < D; ++d) kt[d * ldk + j] = 0.0f;
            // the keys a block at a time (contiguous slots), the blocks split over the threads
            #pragma omp for schedule(static)
            for (long j0 = 0; j0 < nk; j0 += bs) {
              const long j1 = j0 + bs < nk ? j0 + bs : nk;
              for_each_slot(ptab, P, rtab, k0 + j1, k0 + j0, bs, [&](long jj, long slot) {
                const long j = j0 + jj;
                const T* kr = kc + (slot * Hkv + h) * D;
                const T* vr = vc + (slot * Hkv + h) * D;
                const float kscale = ks ? ks[slot * Hkv + h] : 1.0f;
                const float vscale = vs ? vs[slot * Hkv + h] : 1.0f;
                for (long d = 0; d < D; d += VW) {
                    float tmp[VW];
                    vstoref(tmp, vmul(ld_kv(kr + d), vset1(kscale)));
                    for (int l = 0; l < VW; ++l) kt[(d + l) * ldk + j] = tmp[l];
                    vstoref(vp + j * D + d, vmul(ld_kv(vr + d), vset1(vscale)));
                }
              });
            }
            // Per thread: the strip's queries, scores and output, float32.
            const long lds_max = round_up(nk, QK_NR);  // no strip sees more keys
            float* qs = (float*)malloc(sizeof(float) * rows_max * (2 * D + 1 + lds_max));
            float* os = qs + rows_max * D;
            float* inv = os + rows_max * D;
            float* sc = inv + rows_max;
            // Later strips see more keys: hand them out first.
            #pragma omp for schedule(dynamic, 1)
            for (long si = strips - 1; si >= 0; --si) {
                if (!qs) continue;
                const long s = si * tq, nt = q_len - s < tq ? q_len - s : tq;
                const long p0 = first + s, hi = p0 + nt;
                const long lo = window > 0 && p0 - window + 1 > k0 ? p0 - window + 1 : k0;
                const long n = hi - lo, lds = round_up(n, QK_NR);
                const long rows = nt * G, rows_qk = round_up(rows, QK_MR);
                for (long t = 0; t < nt; ++t) {
                    const uint16_t* src = q + ((s + t) * Hq + h * G) * D;
                    for (long i = 0; i < G * D; i += VW)
                        vstoref(qs + t * G * D + i, vmul(vload(src + i, VW), vset1(scale)));
                }
                for (long i = rows * D; i < rows_max * D; ++i) qs[i] = 0.0f;
                const float* ktb = kt + (lo - k0);
                for (long c = 0; c < lds; c += QK_NR)
                    for (long r = 0; r < rows_qk; r += QK_MR)
                        qk_tile(qs + r * D, D, ktb + c, ldk, sc + r * lds + c, lds);
                // softmax over each row's visible keys [a, b); the rest of the row becomes 0
                for (long r = 0; r < rows_max; ++r) {
                    float* row = sc + r * lds;
                    if (r >= rows) {
                        for (long j = 0; j < n; ++j) row[j] = 0.0f;
                        inv[r] = 0.0f;
                        continue;
                    }
                    const long pos = p0 + r / G;
                    const long a = window > 0 && pos - window + 1 > lo ? pos - window + 1 - lo : 0;
                    const long b = pos - lo + 1;
                    vf vm = vset1(-__builtin_inff());
                    long j = a;
                    for (; j + VW <= b; j += VW) vm = vmax(vm, vloadf(row + j));
                    float mx = vhmax(vm);
                    for (; j < b; ++j) mx = row[j] > mx ? row[j] : mx;
                    vf sum = vzero();
                    const vf vmx = vset1(mx);
                    for (j = a; j + VW <= b; j += VW) {
                        const vf e = vexp_nonpositive(vsub(vloadf(row + j), vmx));
                        vstoref(row + j, e);
                        sum = vadd(sum, e);
                    }
                    float tail = 0.0f;
                    for (; j < b; ++j) tail += (row[j] = __builtin_expf(row[j] - mx));
                    for (j = 0; j < a; ++j) row[j] = 0.0f;
                    for (j = b; j < n; ++j) row[j] = 0.0f;
                    inv[r] = 1.0f / (vsum(sum) + tail);
                }
                // P V over key chunks whose V rows (PV_KEYS x D floats) stay in L1 while every
                // row tile reads them; a row tile stops at its last row's position.
                for (long i = 0; i < rows_max * D; ++i) os[i] = 0.0f;
                const float* vb = vp + (lo - k0) * D;
                for (long j0 = 0; j0 < n; j0 += PV_KEYS) {
                    for (long r = 0; r < rows; r += PV_MR) {
                        const long last = r + PV_MR - 1 < rows ? r + PV_MR - 1 : rows - 1;
                        const long seen = p0 + last / G - lo + 1;
                        const long j1 = j0 + PV_KEYS < seen ? j0 + PV_KEYS : seen;
                        if (j1 <= j0) continue;
                        long c0 = 0;
                        for (; c0 + 2 * VW <= D; c0 += 2 * VW)
                            pv_tile<2>(sc + r * lds, lds, vb, D, j0, j1, c0, os + r * D);
                        if (c0 < D) pv_tile<1>(sc + r * lds, lds, vb, D, j0, j1, c0, os + r * D);
                    }
                }
                for (long r = 0; r < rows; ++r) {
                    uint16_t* dst = out + ((s + r / G) * Hq + h * G + r % G) * D;
                    const vf iv = vset1(inv[r]);
                    for (long d = 0; d < D; d += VW)
                        vstore(dst + d, vmul(vloadf(os + r * D + d), iv), VW);
                }
            }
            free(qs);
        }
    }
    free(kt);
}

extern "C" void segserve_prefill_attention(const uint16_t* q, const void* kc, const void* vc,
                                           const float* ks, const float* vs,
                                           const int32_t* ptab, long P, const int32_t* rtab,
                                           long R, long q_len, long Hq, long Hkv, long D, long bs,
                                           float scale, long window, long tq, uint16_t* out,
                                           int threads) {
    if (ks)
        prefill_attn<int8_t>(q, (const int8_t*)kc, (const int8_t*)vc, ks, vs, ptab, P, rtab, R,
                             q_len, Hq, Hkv, D, bs, scale, window, tq, out, threads);
    else
        prefill_attn<uint16_t>(q, (const uint16_t*)kc, (const uint16_t*)vc, ks, vs, ptab, P,
                               rtab, R, q_len, Hq, Hkv, D, bs, scale, window, tq, out, threads);
}

// ----- decode attention: one query per sequence, over both segments' blocks ---------------------
// out[b, h*G + g] = softmax(q . K^T * scale) V over the sequence's keys (prompt blocks, then
// response blocks; a sliding window keeps the last `window`), float32 inside. T: bf16 pool
// (uint16_t, scales null) or int8 (scales per (slot, head)). D % VW == 0. One task per
// (sequence, KV head): its keys and values are read once into float buffers (int8 dequantized),
// the G heads' scores go 8 keys at a time (8 dot-product accumulators over D, summed across
// lanes together by vsum8), a softmax per head, then P V in the prefill's PV_MR x 2-vector tiles,
// so no per-key horizontal sum and no accumulator round trip through memory.
template <typename T>
static void decode_attn(const uint16_t* q, const T* kc, const T* vc, const float* ks,
                        const float* vs, const int32_t* ptab, long wp, const int32_t* plen,
                        const int32_t* rtab, long wr, const int32_t* rlen, long B, long Hq,
                        long Hkv, long D, long bs, float scale, long window, uint16_t* out,
                        int threads) {
    const long G = Hq / Hkv, Gp = round_up(G, PV_MR);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1)
    for (long task = 0; task < B * Hkv; ++task) {
        const long b = task / Hkv, h = task % Hkv;
        const long P = plen[b], ctx = P + rlen[b];
        const long lo = window > 0 && ctx - window > 0 ? ctx - window : 0;
        const long n = ctx - lo, np = round_up(n, 8);
        // keys [np][D], values [n][D], scores [Gp][np], queries [G][D], output [Gp][D], 1/sum [G]
        float* kf = (float*)malloc(sizeof(float) * (np * D + n * D + Gp * np + G * D + Gp * D + G));
        if (!kf) continue;
        float* vb = kf + np * D;
        float* sc = vb + n * D;
        float* qf = sc + Gp * np;
        float* os = qf + G * D;
        float* inv = os + Gp * D;
        for_each_slot(ptab + b * wp, P, rtab + b * wr, ctx, lo, bs, [&](long j, long slot) {
            const vf kscale = vset1(ks ? ks[slot * Hkv + h] : 1.0f);
            const vf vscale = vset1(vs ? vs[slot * Hkv + h] : 1.0f);
            const T* kr = kc + (slot * Hkv + h) * D;
            const T* vr = vc + (slot * Hkv + h) * D;
            for (long d = 0; d < D; d += VW) {
                vstoref(kf + j * D + d, vmul(ld_kv(kr + d), kscale));
                vstoref(vb + j * D + d, vmul(ld_kv(vr + d), vscale));
            }
        });
        for (long i = n * D; i < np * D; ++i) kf[i] = 0.0f;  // padding keys: finite, unused
        const uint16_t* qb = q + (b * Hq + h * G) * D;
        for (long i = 0; i < G * D; i += VW) vstoref(qf + i, vmul(vload(qb + i, VW), vset1(scale)));
        for (long g = 0; g < G; ++g) {
            float* row = sc + g * np;
            for (long j0 = 0; j0 < np; j0 += 8) {
                vf acc[8];
                for (int t = 0; t < 8; ++t) acc[t] = vzero();
                for (long d = 0; d < D; d += VW) {
                    const vf qv = vloadf(qf + g * D + d);
                    for (int t = 0; t < 8; ++t)
                        acc[t] = vfma(qv, vloadf(kf + (j0 + t) * D + d), acc[t]);
                }
                vsum8(acc, row + j0);
            }
            vf vm = vset1(-__builtin_inff());
            long j = 0;
            for (; j + VW <= n; j += VW) vm = vmax(vm, vloadf(row + j));
            float mx = vhmax(vm);
            for (; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
            const vf vmx = vset1(mx);
            vf sum = vzero();
            for (j = 0; j + VW <= n; j += VW) {
                const vf e = vexp_nonpositive(vsub(vloadf(row + j), vmx));
                vstoref(row + j, e);
                sum = vadd(sum, e);
            }
            float tail = 0.0f;
            for (; j < n; ++j) tail += (row[j] = __builtin_expf(row[j] - mx));
            inv[g] = 1.0f / (vsum(sum) + tail);
        }
        for (long i = G * np; i < Gp * np; ++i) sc[i] = 0.0f;  // padding heads
        for (long i = 0; i < Gp * D; ++i) os[i] = 0.0f;
        for (long g = 0; g < Gp; g += PV_MR) {
            long c0 = 0;
            for (; c0 + 2 * VW <= D; c0 += 2 * VW)
                pv_tile<2>(sc + g * np, np, vb, D, 0, n, c0, os + g * D);
            if (c0 < D) pv_tile<1>(sc + g * np, np, vb, D, 0, n, c0, os + g * D);
        }
        for (long g = 0; g < G; ++g) {
            const vf iv = vset1(inv[g]);
            for (long d = 0; d < D; d += VW)
                vstore(out + (b * Hq + h * G + g) * D + d, vmul(vloadf(os + g * D + d), iv), VW);
        }
        free(kf);
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

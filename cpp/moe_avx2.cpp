// AVX2 + FMA kernels. Twins in moe_generic.cpp. Compiled with per-function target
// attributes; only called after isa.cpp found avx2, fma and f16c.
#include <cstring>

#include "gemm_rows.h"
#include "isa.h"
#include "quant.h"

#if KTLAB_X86
#include <immintrin.h>

#define KTLAB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ktlab {

namespace {

KTLAB_AVX2 inline float hsum_ps_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 int32 partial sums of 32 int8 x int8 products (exact: |partial| <= 4 * 128 * 127), given
// aw = |w| as u8 (-128 -> 128); x is multiplied by sign(w).
KTLAB_AVX2 inline __m256i dot32_u8s8_avx2(__m256i aw, __m256i w, __m256i x) {
    const __m256i sx = _mm256_sign_epi8(x, w);
    const __m256i p16 = _mm256_maddubs_epi16(aw, sx);  // pairs, |.| <= 2*128*127 < 32767
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

}  // namespace

// NT activation rows against one Q8_0 row: blocks in pairs, two accumulators per token. Each
// token gets exactly the operations of a lone dot product (NT = 1), so its result never
// depends on how many tokens come with it; |w| and the fp16 scales are prepared once for all.
template <int NT>
KTLAB_AVX2 inline void q8_0_dot_rows_avx2(const block_q8_0* wr, const block_q8_act* const* xq, int nb, float* out) {
    __m256 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 64, _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)wr[b].qs);
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)wr[b + 1].qs);
        const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
        const float d0 = _cvtsh_ss(wr[b].d), d1 = _cvtsh_ss(wr[b + 1].d);
        for (int t = 0; t < NT; ++t) {
            const block_q8_act* x = xq[t];
            const __m256i p0 = dot32_u8s8_avx2(a0, w0, _mm256_loadu_si256((const __m256i*)x[b].qs));
            const __m256i p1 = dot32_u8s8_avx2(a1, w1, _mm256_loadu_si256((const __m256i*)x[b + 1].qs));
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * x[b].d), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * x[b + 1].d), acc1[t]);
        }
    }
    if (b < nb) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)wr[b].qs);
        const __m256i a0 = _mm256_sign_epi8(w0, w0);
        const float d0 = _cvtsh_ss(wr[b].d);
        for (int t = 0; t < NT; ++t) {
            const block_q8_act* x = xq[t];
            const __m256i p0 = dot32_u8s8_avx2(a0, w0, _mm256_loadu_si256((const __m256i*)x[b].qs));
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * x[b].d), acc0[t]);
        }
    }
    for (int t = 0; t < NT; ++t) out[t] = hsum_ps_avx2(_mm256_add_ps(acc0[t], acc1[t]));
}

// One Q8_0 row against one activation row (the NT = 1 case).
KTLAB_AVX2 float q8_0_dot_avx2(const uint8_t* w, const uint8_t* x, int k) {
    const block_q8_act* xq = reinterpret_cast<const block_q8_act*>(x);
    float out;
    q8_0_dot_rows_avx2<1>(reinterpret_cast<const block_q8_0*>(w), &xq, k / QK8_0, &out);
    return out;
}

KTLAB_AVX2 void q8_0_gemv_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb,
                                    float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        y[r] = q8_0_dot_avx2(w + (size_t)r * row_bytes, reinterpret_cast<const uint8_t*>(xq), nb * QK8_0);
    }
}

// y[j * ldy + r] for r in [r0, r1), j in [0, m): tokens in fours, then the rest one by one.
KTLAB_AVX2 void q8_0_gemm_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m,
                                    float* y, size_t ldy, int r0, int r1) {
    q8_0_gemm_rows_by_fours<q8_0_dot_rows_avx2<4>, q8_0_dot_rows_avx2<1>>(w, row_bytes, xq, nb, m, y, ldy, r0, r1);
}

// ---- dense Q8_0x16 (quant.h): eight rows per ymm, no horizontal sums --------------------------
// A half group (8 rows) of block b, chunk kk holds rows' 4 quants side by side (32 bytes), so
// one maddubs + madd against a token's 4 quants broadcast gives those 8 rows' partial dots in
// the 8 int32 lanes. Per token and row: the exact int32 block dot, then acc += (d_w * d_x) * dot
// as one FMA, blocks in order: the same arithmetic whatever the token count or tile.

namespace {

// NT tokens against H halves (8 rows each) of one group, starting at half `first`. H = 2 (one or
// two tokens) streams the whole group in one pass with a near prefetch, as a decode GEMV wants;
// H = 1 (three or four tokens) takes a half at a time, the first pass prefetching far ahead and
// the second finding the group in L2. Every row and token gets the same arithmetic either way.
template <int NT, int H>
struct Q8x16Tile {
    KTLAB_AVX2 static void run(const uint8_t* group, int nb, int first, const block_q8_act* const* x, float* y,
                               size_t ldy) {
        __m256 acc[NT][H];
        for (int t = 0; t < NT; ++t) {
            for (int h = 0; h < H; ++h) acc[t][h] = _mm256_setzero_ps();
        }
        const __m256i ones = _mm256_set1_epi16(1);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* block = q8x16_block(group, b);
            if (H == 2) {
                for (int l = 0; l < kQ8x16BlockBytes; l += 64) _mm_prefetch((const char*)block + kPrefetchBytes + l, _MM_HINT_T0);
            } else if (first == 0) {
                for (int l = 0; l < kQ8x16BlockBytes; l += 64) _mm_prefetch((const char*)block + 8192 + l, _MM_HINT_T1);
            }
            __m256i isum[NT][H];
            for (int t = 0; t < NT; ++t) {
                for (int h = 0; h < H; ++h) isum[t][h] = _mm256_setzero_si256();
            }
            for (int kk = 0; kk < QK8_0 / 4; ++kk) {
                __m256i wv[H], aw[H];
                for (int h = 0; h < H; ++h) {
                    wv[h] = _mm256_loadu_si256((const __m256i*)(block + 64 * kk + 32 * (first + h)));
                    aw[h] = _mm256_sign_epi8(wv[h], wv[h]);
                }
                for (int t = 0; t < NT; ++t) {
                    int32_t four;
                    std::memcpy(&four, x[t][b].qs + 4 * kk, 4);
                    const __m256i xv = _mm256_set1_epi32(four);
                    for (int h = 0; h < H; ++h) {
                        const __m256i sx = _mm256_sign_epi8(xv, wv[h]);
                        isum[t][h] = _mm256_add_epi32(isum[t][h], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[h], sx), ones));
                    }
                }
            }
            for (int h = 0; h < H; ++h) {
                const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(q8x16_scales(block) + 8 * (first + h))));
                for (int t = 0; t < NT; ++t) {
                    const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t][b].d));
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][h]), scale, acc[t][h]);
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            for (int h = 0; h < H; ++h) _mm256_storeu_ps(y + (size_t)t * ldy + 8 * (first + h), acc[t][h]);
        }
    }
};

constexpr int kAvx2TokenTile = 4;

}  // namespace

KTLAB_AVX2 void q8_0x16_gemm_avx2(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                                  float* y, size_t ldy) {
    const int nb = k / QK8_0;
    for (int r0 = 0; r0 < n; r0 += kQ8x16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; j += kAvx2TokenTile) {
            const block_q8_act* xr[kAvx2TokenTile];
            const int tt = m - j < kAvx2TokenTile ? m - j : kAvx2TokenTile;
            for (int t = 0; t < tt; ++t) xr[t] = reinterpret_cast<const block_q8_act*>(x.row(j + t));
            float* yt = y + (size_t)j * ldy + r0;
            switch (tt) {
                case 1: Q8x16Tile<1, 2>::run(group, nb, 0, xr, yt, ldy); break;
                case 2: Q8x16Tile<2, 2>::run(group, nb, 0, xr, yt, ldy); break;
                case 3:
                    for (int half = 0; half < 2; ++half) Q8x16Tile<3, 1>::run(group, nb, half, xr, yt, ldy);
                    break;
                default:
                    for (int half = 0; half < 2; ++half) Q8x16Tile<4, 1>::run(group, nb, half, xr, yt, ldy);
                    break;
            }
        }
    }
}

// ---- activation quantizer ------------------------------------------------------------------
// Twin of quantize_row_q8_act, bit for bit (as quantize_row_q8_act_avx512): the same amax,
// d = amax / 127 and 1 / d (scalar), x * (1 / d) in fp32, then roundf (ties away from zero) as
// trunc + (|frac| >= 0.5 ? +-1 : 0), exact because frac = p - trunc(p) is exact for |p| <= 127.5.

namespace {

KTLAB_AVX2 inline __m256i round_to_i32(__m256 p) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 t = _mm256_round_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(p, t));
    const __m256 one = _mm256_or_ps(_mm256_and_ps(p, sign_bit), _mm256_set1_ps(1.0f));
    const __m256 up = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), one);
    return _mm256_cvtps_epi32(_mm256_add_ps(t, up));  // an integer already: conversion is exact
}

KTLAB_AVX2 inline float hmax_abs(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_bit, a), _mm256_andnot_ps(sign_bit, b)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign_bit, c), _mm256_andnot_ps(sign_bit, d)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

}  // namespace

KTLAB_AVX2 void quantize_row_q8_act_avx2(const float* x, block_q8_act* y, int64_t k) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
    for (int64_t b = 0; b < k / QK8_0; ++b) {
        const float* xb = x + QK8_0 * b;
        const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
                     v3 = _mm256_loadu_ps(xb + 24);
        const float amax = hmax_abs(v0, v1, v2, v3);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        const __m256 s = _mm256_set1_ps(id);
        const __m256i q01 = _mm256_packs_epi32(round_to_i32(_mm256_mul_ps(v0, s)), round_to_i32(_mm256_mul_ps(v1, s)));
        const __m256i q23 = _mm256_packs_epi32(round_to_i32(_mm256_mul_ps(v2, s)), round_to_i32(_mm256_mul_ps(v3, s)));
        const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), order);
        _mm256_storeu_si256((__m256i*)y[b].qs, q);
    }
}

KTLAB_AVX2 inline int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

// Twin of quantize_row_q8_K, bit for bit, the same way (the 16-value sums of the int8 quants, exact).
KTLAB_AVX2 void quantize_row_q8_K_avx2(const float* x, block_q8_K* y, int64_t k) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
    for (int64_t b = 0; b < k / QK_K; ++b) {
        const float* xb = x + QK_K * b;
        const __m256 sign_bit = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < QK_K / 8; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb + 8 * i)));
        const float amax = hmax_abs(m, m, m, m);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        const __m256 s = _mm256_set1_ps(id);
        for (int i = 0; i < QK_K / 32; ++i) {
            __m256i q[4];
            for (int v = 0; v < 4; ++v) q[v] = round_to_i32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * i + 8 * v), s));
            const __m256i q01 = _mm256_packs_epi32(q[0], q[1]), q23 = _mm256_packs_epi32(q[2], q[3]);
            _mm256_storeu_si256((__m256i*)(y[b].qs + 32 * i), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), order));
            y[b].bsums[2 * i] = (int16_t)hsum_epi32_avx2(_mm256_add_epi32(q[0], q[1]));
            y[b].bsums[2 * i + 1] = (int16_t)hsum_epi32_avx2(_mm256_add_epi32(q[2], q[3]));
        }
    }
}

// ---- K-quants: exact int32 per super-block (the same integers as the scalar twin) ----------
// These 256-bit kernels also serve the AVX-512 and AMX paths (no wider K-quant kernel yet).

// 8 int32 lanes of sum(u8 * s8) with each 16-bit pair-sum weighted by `scale` (int16 lanes):
// |u8 * s8 pair| <= 2 * 63 * 127 < 2^15, so maddubs never saturates for 6-bit weights.
KTLAB_AVX2 inline __m256i dot_u8s8_scaled(__m256i u, __m256i s, __m256i scale) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale);
}


KTLAB_AVX2 float q4_k_dot_avx2(const uint8_t* w, const uint8_t* x, int k) {
    const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w);
    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_K; ++b) {
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes + 128, _MM_HINT_T0);
        uint8_t sc[8];
        const int32_t summ = q4_k_mins_dot(wb[b].scales, xb[b], sc);
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i q4 = _mm256_loadu_si256((const __m256i*)(wb[b].qs + 32 * j));
            const __m256i lo = _mm256_and_si256(q4, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), low4);
            const __m256i x_lo = _mm256_loadu_si256((const __m256i*)(xb[b].qs + 64 * j));
            const __m256i x_hi = _mm256_loadu_si256((const __m256i*)(xb[b].qs + 64 * j + 32));
            acc = _mm256_add_epi32(acc, dot_u8s8_scaled(lo, x_lo, _mm256_set1_epi16(sc[2 * j])));
            acc = _mm256_add_epi32(acc, dot_u8s8_scaled(hi, x_hi, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        const int32_t isum = hsum_epi32_avx2(acc);
        sum += xb[b].d * (_cvtsh_ss(wb[b].d) * (float)isum - _cvtsh_ss(wb[b].dmin) * (float)summ);
    }
    return sum;
}

// Q6_K: per 128-half, four 32-value vectors of u6 = low nibble | 2 high bits << 4; each
// vector spans two 16-value sub-blocks (one per 128-bit lane, matching maddubs' lanes).
KTLAB_AVX2 float q6_k_dot_avx2(const uint8_t* w, const uint8_t* x, int k) {
    const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w);
    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i two = _mm256_set1_epi8(0x03);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_K; ++b) {
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes + 128, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + b) + kPrefetchBytes + 192, _MM_HINT_T0);
        __m256i acc = _mm256_setzero_si256();
        for (int half = 0; half < 2; ++half) {
            const uint8_t* ql = wb[b].ql + 64 * half;
            const __m256i qh = _mm256_loadu_si256((const __m256i*)(wb[b].qh + 32 * half));
            const __m256i ql0 = _mm256_loadu_si256((const __m256i*)ql);
            const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(ql + 32));
            const __m256i nib[4] = {_mm256_and_si256(ql0, low4), _mm256_and_si256(ql1, low4),
                                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4)};
            const int8_t* sc = wb[b].scales + 8 * half;
            for (int q = 0; q < 4; ++q) {
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * q), two);
                const __m256i u6 = _mm256_or_si256(nib[q], _mm256_slli_epi16(high, 4));
                const __m256i xq = _mm256_loadu_si256((const __m256i*)(xb[b].qs + 128 * half + 32 * q));
                const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(sc[2 * q + 1]), _mm_set1_epi16(sc[2 * q]));
                acc = _mm256_add_epi32(acc, dot_u8s8_scaled(u6, xq, scale));
            }
        }
        const int32_t isum = hsum_epi32_avx2(acc) - q6_k_offset_dot(wb[b], xb[b]);
        sum += (_cvtsh_ss(wb[b].d) * xb[b].d) * (float)isum;
    }
    return sum;
}

// ---- BF16: widen to fp32 (a 16-bit shift) and FMA ---------------------------------------------

KTLAB_AVX2 inline __m256 bf16x8_to_ps(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

KTLAB_AVX2 float bf16_dot_avx2(const uint8_t* w, const uint8_t* x, int k) {
    const uint16_t* wv = reinterpret_cast<const uint16_t*>(w);
    const uint16_t* xv = reinterpret_cast<const uint16_t*>(x);
    __m256 acc0 = _mm256_setzero_ps();
    __m256 acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        _mm_prefetch((const char*)(wv + i) + kPrefetchBytes, _MM_HINT_T0);
        acc0 = _mm256_fmadd_ps(bf16x8_to_ps(wv + i), bf16x8_to_ps(xv + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8_to_ps(wv + i + 8), bf16x8_to_ps(xv + i + 8), acc1);
    }
    float sum = hsum_ps_avx2(_mm256_add_ps(acc0, acc1));
    for (; i < k; ++i) sum += bf16_to_fp32(wv[i]) * bf16_to_fp32(xv[i]);
    return sum;
}

// Raw Q8_0 expert rows (the fallback where a matrix's rows are no multiple of 16, else the experts
// are Q8_0x16): an expert's tokens in fours per pass over each weight row (each token still gets
// exactly the operations of a lone dot product).
KTLAB_AVX2 KTLAB_GEMM_DECL(q8_0_gemm_avx2) {
    q8_0_gemm_act_rows_by_fours<q8_0_dot_rows_avx2<4>, q8_0_dot_rows_avx2<1>>(w, row_bytes, n, k, x, m, y, ldy);
}
KTLAB_GEMM_BY_ROWS(q4_k_gemm_avx2, q4_k_dot_avx2)
KTLAB_GEMM_BY_ROWS(q6_k_gemm_avx2, q6_k_dot_avx2)
KTLAB_GEMM_BY_ROWS(bf16_gemm_avx2, bf16_dot_avx2)

}  // namespace ktlab

#else  // not x86: never selected (isa.cpp reports no AVX2), defined so the table links

namespace ktlab {
void quantize_row_q8_act_avx2(const float* x, block_q8_act* y, int64_t k) { quantize_row_q8_act(x, y, k); }
void quantize_row_q8_K_avx2(const float* x, block_q8_K* y, int64_t k) { quantize_row_q8_K(x, y, k); }
KTLAB_GEMM_DECL(q8_0x16_gemm_avx2) { q8_0x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0_gemv_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, float* y,
                         int r0, int r1) {
    q8_0_gemv_rows_scalar(w, row_bytes, xq, nb, y, r0, r1);
}
KTLAB_GEMM_DECL(q8_0_gemm_avx2) { q8_0_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0_gemm_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m, float* y,
                         size_t ldy, int r0, int r1) {
    q8_0_gemm_rows_scalar(w, row_bytes, xq, nb, m, y, ldy, r0, r1);
}
KTLAB_GEMM_DECL(q4_k_gemm_avx2) { q4_k_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q6_k_gemm_avx2) { q6_k_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16_gemm_avx2) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

// AVX-512 (F/BW/VL) + VNNI kernels. Twins in moe_generic.cpp. Compiled with per-function
// target attributes; only called after isa.cpp found avx512f/bw/vl/vnni (and avx2/fma/f16c).
#include "gemm_rows.h"
#include "isa.h"
#include "quant.h"

#if KTLAB_X86
// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>
#include <utility>
#include <vector>

#define KTLAB_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define KTLAB_AVX512BF16 \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

namespace ktlab {

namespace {

// Two Q8_0 blocks' 32 quants side by side: block a in lanes 0..7, block b in lanes 8..15.
KTLAB_AVX512 inline __m512i load_2x32(const int8_t* a, const int8_t* b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                              _mm256_loadu_si256((const __m256i*)b), 1);
}

// 16 int32 partial sums of w . x (64 int8 products), the weight side prepared: vpdpbusd
// wants u8 x s8, so it gets a = |w| (u8, -128 -> 128) and x * sign(w) (neg = the sign mask
// of w); exact, |partial| <= 4 * 128 * 127.
KTLAB_AVX512 inline __m512i dot64_u8s8_vnni(__m512i a, __mmask64 neg, __m512i x) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
}

KTLAB_AVX512 inline __m256i dot32_i8_vnni(__m256i w, __m256i x) {
    const __m256i aw = _mm256_sign_epi8(w, w);
    const __m256i sx = _mm256_sign_epi8(x, w);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
}

// Scale vector: s0 in lanes 0..7, s1 in lanes 8..15.
KTLAB_AVX512 inline __m512 scales_2(float s0, float s1) {
    return _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
}

}  // namespace

// NT activation rows against one Q8_0 weight row: blocks in fours (two 512-bit VNNI dots of
// two blocks each), then a pair, an odd last block through 256-bit VNNI. Each token gets
// exactly the operations, in the order, of a lone dot product (NT = 1), so a token's result
// never depends on how many tokens come with it; the weight side (|w|, its sign mask, the
// fp16 scales) is loaded and prepared once for all NT.
template <int NT>
KTLAB_AVX512 inline void q8_0_dot_rows_avx512(const block_q8_0* wr, const block_q8_act* const* xq, int nb,
                                              float* out) {
    __m512 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 3 < nb; b += 4) {
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 128, _MM_HINT_T0);
        const __m512i w0 = load_2x32(wr[b].qs, wr[b + 1].qs);
        const __m512i w1 = load_2x32(wr[b + 2].qs, wr[b + 3].qs);
        const __mmask64 n0 = _mm512_movepi8_mask(w0), n1 = _mm512_movepi8_mask(w1);
        const __m512i a0 = _mm512_abs_epi8(w0), a1 = _mm512_abs_epi8(w1);
        const float d0 = _cvtsh_ss(wr[b].d), d1 = _cvtsh_ss(wr[b + 1].d);
        const float d2 = _cvtsh_ss(wr[b + 2].d), d3 = _cvtsh_ss(wr[b + 3].d);
        for (int t = 0; t < NT; ++t) {
            const block_q8_act* x = xq[t];
            const __m512i p0 = dot64_u8s8_vnni(a0, n0, load_2x32(x[b].qs, x[b + 1].qs));
            const __m512i p1 = dot64_u8s8_vnni(a1, n1, load_2x32(x[b + 2].qs, x[b + 3].qs));
            acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), scales_2(d0 * x[b].d, d1 * x[b + 1].d), acc0[t]);
            acc1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), scales_2(d2 * x[b + 2].d, d3 * x[b + 3].d), acc1[t]);
        }
    }
    for (; b + 1 < nb; b += 2) {
        const __m512i w0 = load_2x32(wr[b].qs, wr[b + 1].qs);
        const __mmask64 n0 = _mm512_movepi8_mask(w0);
        const __m512i a0 = _mm512_abs_epi8(w0);
        const float d0 = _cvtsh_ss(wr[b].d), d1 = _cvtsh_ss(wr[b + 1].d);
        for (int t = 0; t < NT; ++t) {
            const block_q8_act* x = xq[t];
            const __m512i p0 = dot64_u8s8_vnni(a0, n0, load_2x32(x[b].qs, x[b + 1].qs));
            acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), scales_2(d0 * x[b].d, d1 * x[b + 1].d), acc0[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        float tail = 0.0f;
        if (b < nb) {
            const block_q8_act* x = xq[t];
            const __m256i p = dot32_i8_vnni(_mm256_loadu_si256((const __m256i*)wr[b].qs),
                                            _mm256_loadu_si256((const __m256i*)x[b].qs));
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(wr[b].d) * x[b].d));
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            tail = _mm_cvtss_f32(s);
        }
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + tail;
    }
}

// One row against one activation row (the NT = 1 case).
KTLAB_AVX512 float q8_0_dot_row_avx512(const block_q8_0* wr, const block_q8_act* xq, int nb) {
    float out;
    q8_0_dot_rows_avx512<1>(wr, &xq, nb, &out);
    return out;
}

KTLAB_AVX512 void q8_0_gemv_rows_avx512(const uint8_t* w, size_t row_bytes, const block_q8_act* xq,
                                        int nb, float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        y[r] = q8_0_dot_row_avx512(reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes), xq, nb);
    }
}

// y[j * ldy + r] for r in [r0, r1), j in [0, m): tokens in fours, then the rest one by one.
KTLAB_AVX512 void q8_0_gemm_rows_avx512(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m,
                                        float* y, size_t ldy, int r0, int r1) {
    q8_0_gemm_rows_by_fours<q8_0_dot_rows_avx512<4>, q8_0_dot_rows_avx512<1>>(w, row_bytes, xq, nb, m, y, ldy, r0,
                                                                            r1);
}

KTLAB_AVX512 float q8_0_dot_avx512(const uint8_t* w, const uint8_t* x, int k) {
    return q8_0_dot_row_avx512(reinterpret_cast<const block_q8_0*>(w), reinterpret_cast<const block_q8_act*>(x),
                               k / QK8_0);
}

// ---- activation quantizer ------------------------------------------------------------------
// Twin of quantize_row_q8_act, bit for bit: the same amax, d = amax / 127 and 1 / d (scalar),
// x * (1 / d) in fp32, then roundf (ties away from zero) as trunc + (|frac| >= 0.5 ? +-1 : 0),
// exact because frac = p - trunc(p) is exact for |p| <= 127.5.

KTLAB_AVX512 inline __m512i round_to_i32(__m512 p) {
    const __m512 t = _mm512_roundscale_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(p, t));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(p), _mm512_set1_epi32((int)0x80000000u));
    const __m512 one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0f))));
    const __m512 r = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ), t, one);
    return _mm512_cvtps_epi32(r);
}

KTLAB_AVX512 inline __m128i round_to_i8(__m512 p) { return _mm512_cvtsepi32_epi8(round_to_i32(p)); }

KTLAB_AVX512 void quantize_row_q8_act_avx512(const float* x, block_q8_act* y, int64_t k) {
    for (int64_t b = 0; b < k / QK8_0; ++b) {
        const __m512 v0 = _mm512_loadu_ps(x + QK8_0 * b);
        const __m512 v1 = _mm512_loadu_ps(x + QK8_0 * b + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        _mm_storeu_si128((__m128i*)y[b].qs, round_to_i8(_mm512_mul_ps(v0, _mm512_set1_ps(id))));
        _mm_storeu_si128((__m128i*)(y[b].qs + 16), round_to_i8(_mm512_mul_ps(v1, _mm512_set1_ps(id))));
    }
}

// Twin of quantize_row_q8_K, bit for bit, the same way (the 16-value sums of the int8 quants, exact).
KTLAB_AVX512 void quantize_row_q8_K_avx512(const float* x, block_q8_K* y, int64_t k) {
    for (int64_t b = 0; b < k / QK_K; ++b) {
        const float* xb = x + QK_K * b;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < QK_K / 16; ++i) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)));
        const float amax = _mm512_reduce_max_ps(m);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int i = 0; i < QK_K / 16; ++i) {
            const __m512i q = round_to_i32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * i), _mm512_set1_ps(id)));
            _mm_storeu_si128((__m128i*)(y[b].qs + 16 * i), _mm512_cvtsepi32_epi8(q));
            y[b].bsums[i] = (int16_t)_mm512_reduce_add_epi32(q);
        }
    }
}

// ---- BF16 ----------------------------------------------------------------------------------
// Values past the last multiple of 32 go through the scalar tail (k is any length).

KTLAB_AVX512 inline __m512 bf16x16_to_ps(const uint16_t* p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline float bf16_dot_tail(const uint16_t* w, const uint16_t* x, int i, int k) {
    float sum = 0.0f;
    for (; i < k; ++i) sum += bf16_to_fp32(w[i]) * bf16_to_fp32(x[i]);
    return sum;
}

// avx512f only: widen both to fp32, FMA.
KTLAB_AVX512 float bf16_dot_avx512(const uint8_t* w, const uint8_t* x, int k) {
    const uint16_t* wv = reinterpret_cast<const uint16_t*>(w);
    const uint16_t* xv = reinterpret_cast<const uint16_t*>(x);
    __m512 acc0 = _mm512_setzero_ps();
    __m512 acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        _mm_prefetch((const char*)(wv + i) + kPrefetchBytes, _MM_HINT_T0);
        acc0 = _mm512_fmadd_ps(bf16x16_to_ps(wv + i), bf16x16_to_ps(xv + i), acc0);
        acc1 = _mm512_fmadd_ps(bf16x16_to_ps(wv + i + 16), bf16x16_to_ps(xv + i + 16), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bf16_dot_tail(wv, xv, i, k);
}

// avx512_bf16: vdpbf16ps, 32 products per instruction (exact bf16 x bf16, fp32 sums).
KTLAB_AVX512BF16 float bf16_dot_avx512bf16(const uint8_t* w, const uint8_t* x, int k) {
    const uint16_t* wv = reinterpret_cast<const uint16_t*>(w);
    const uint16_t* xv = reinterpret_cast<const uint16_t*>(x);
    __m512 acc0 = _mm512_setzero_ps();
    __m512 acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= k; i += 64) {
        _mm_prefetch((const char*)(wv + i) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wv + i) + kPrefetchBytes + 64, _MM_HINT_T0);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wv + i), (__m512bh)_mm512_loadu_si512(xv + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(wv + i + 32),
                                (__m512bh)_mm512_loadu_si512(xv + i + 32));
    }
    for (; i + 32 <= k; i += 32) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wv + i), (__m512bh)_mm512_loadu_si512(xv + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bf16_dot_tail(wv, xv, i, k);
}

// ---- Q8_0x16 and BF16x16 (repacked at load, quant.h) ------------------------------------------
// One zmm of packed weights is 16 rows x 4 int8 (2 bf16): vpdpbusd (vdpbf16ps) with 4 (2)
// activation values broadcast gives 16 row partial sums, so each weight load feeds up to
// kTokenTile tokens (register blocking; the weights come from memory for the first token
// tile, from L1 for the others). Decode (one token) streams the packed rows like a GEMV.
// vpdpbusd is u8 x s8: the activations go in as q + 128 (u8), and each block's dot starts
// at -128 * (sum of the row's weight quants), itself one vpdpbusd with ones per load: exact.

namespace {

constexpr int kTokenTile = 8;

// The activations as the kernel reads them: m rows of q + 128 (k bytes each), then the nb
// scales of each row. Built once per expert per call by q8_0x16_pack_avx512 (the driver's
// pack step) or, for a few rows, per gemm call into a per-thread buffer.
struct OffsetActs {
    const uint8_t* q;
    const float* d;
};

inline size_t offset_q_bytes(int m, int k) { return ((size_t)m * k + 63) / 64 * 64; }

inline OffsetActs offset_acts_at(const uint8_t* p, int m, int k) {
    return {p, reinterpret_cast<const float*>(p + offset_q_bytes(m, k))};
}

KTLAB_AVX512 void offset_activations(const ActRows& x, int m, int k, uint8_t* out) {
    const int nb = k / QK8_0;
    float* d = reinterpret_cast<float*>(out + offset_q_bytes(m, k));
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int j = 0; j < m; ++j) {
        const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x.row(j));
        for (int b = 0; b < nb; ++b) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)xb[b].qs);
            _mm256_storeu_si256((__m256i*)(out + (size_t)j * k + QK8_0 * b), _mm256_xor_si256(v, flip));
            d[(size_t)j * nb + b] = xb[b].d;
        }
    }
}

}  // namespace

size_t q8_0x16_pack_bytes_avx512(int m, int k) { return offset_q_bytes(m, k) + sizeof(float) * m * (k / QK8_0); }

KTLAB_AVX512 void q8_0x16_pack_avx512(const ActRows& x, int m, int k, uint8_t* out) { offset_activations(x, m, k, out); }

namespace {

// Tile<tt>::run(args...) for a run-time tt in [1, kTokenTile]: the token tiles are unrolled
// at compile time (one accumulator register per token).
template <template <int> class Tile, int... TT, class... Args>
inline void run_token_tile(int tt, std::integer_sequence<int, TT...>, const Args&... args) {
    ((tt == TT + 1 ? Tile<TT + 1>::run(args...) : void()), ...);
}

// y[t, 0..16) for TT tokens and one group of 16 Q8_0x16 rows.
template <int TT>
struct Q8x16Tile {
    static constexpr int kChains = TT <= 2 ? 2 : 1;  // independent dot chains per token
    // With few tokens the loop streams fast and a near prefetch into L1 keeps up; with five or
    // more it computes longer per block and a far prefetch into L2 hides more of the memory
    // latency (from DRAM, paired runs: 5-16 tokens 1.0-1.7x; 1-3 tokens 0.8-0.95x). A prefetch
    // changes no result, so the choice by token count keeps rows batch-independent.
    static constexpr bool kFarPrefetch = TT >= 5;
    static constexpr int kFarPrefetchBytes = 8192;

    KTLAB_AVX512 static void run(const uint8_t* group, int nb, const uint8_t* xq, const float* xd, int k, float* y,
                                 size_t ldy) {
        const __m512i ones = _mm512_set1_epi8(1);
        __m512 acc[TT];
        for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* wq = q8x16_block(group, b);
            if constexpr (kFarPrefetch) {
                for (int l = 0; l < kQ8x16BlockBytes; l += 64) _mm_prefetch((const char*)wq + kFarPrefetchBytes + l, _MM_HINT_T1);
            } else {
                for (int l = 0; l < kQ8x16BlockBytes; l += 64) _mm_prefetch((const char*)wq + kPrefetchBytes + l, _MM_HINT_T0);
            }
            // Each dot is sum((q + 128) * w) - 128 * (sum of the row's weight quants in this block).
            // The int32 sums are exact, so they are split into independent chains (two for the
            // weight sums, two per token when there are few tokens) without changing a bit:
            // with one chain a block's dots waited for its weight sum, 16 dependent vpdpbusd.
            __m512i sum_w[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
            __m512i dot[kChains][TT];
            for (int c = 0; c < kChains; ++c) {
                for (int t = 0; t < TT; ++t) dot[c][t] = _mm512_setzero_si512();
            }
            for (int kk = 0; kk < QK8_0 / 4; ++kk) {
                const __m512i wv = _mm512_loadu_si512(wq + 64 * kk);
                sum_w[kk & 1] = _mm512_dpbusd_epi32(sum_w[kk & 1], ones, wv);
                for (int t = 0; t < TT; ++t) {
                    int32_t x4;
                    std::memcpy(&x4, xq + (size_t)t * k + QK8_0 * b + 4 * kk, 4);
                    __m512i& chain = dot[kk % kChains][t];
                    chain = _mm512_dpbusd_epi32(chain, _mm512_set1_epi32(x4), wv);
                }
            }
            const __m512i offset = _mm512_slli_epi32(_mm512_add_epi32(sum_w[0], sum_w[1]), 7);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)q8x16_scales(wq)));
            for (int t = 0; t < TT; ++t) {
                __m512i total = dot[0][t];
                for (int c = 1; c < kChains; ++c) total = _mm512_add_epi32(total, dot[c][t]);
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[(size_t)t * nb + b]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(total, offset)), scale, acc[t]);
            }
        }
        for (int t = 0; t < TT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
    }
};

// y[t, 0..16) for TT tokens and one group of 16 BF16x16 rows: vdpbf16ps with a broadcast
// pair of activations per 64 bytes of weights.
template <int TT>
struct Bf16x16Tile {
    // One or two tokens: two accumulators each (alternate pairs of K), so the vdpbf16ps are
    // not one dependent chain; more tokens are enough independent chains (and registers).
    static constexpr int kChains = TT <= 2 ? 2 : 1;

    KTLAB_AVX512BF16 static void run(const uint16_t* group, int k, const uint16_t* const* xr, float* y, size_t ldy) {
        __m512 acc[kChains][TT];
        for (int s = 0; s < kChains; ++s) {
            for (int t = 0; t < TT; ++t) acc[s][t] = _mm512_setzero_ps();
        }
        for (int c = 0; c < k / kBf16x16Chunk; ++c) {
            const uint16_t* wc = group + (size_t)c * kBf16x16ChunkBytes / 2;
            for (int l = 0; l < kBf16x16ChunkBytes; l += 64) _mm_prefetch((const char*)wc + kPrefetchBytes + l, _MM_HINT_T0);
            for (int kk = 0; kk < kBf16x16Chunk / 2; kk += kChains) {
                for (int s = 0; s < kChains; ++s) {
                    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wc + 2 * kQ8x16Rows * (kk + s));
                    for (int t = 0; t < TT; ++t) {
                        int32_t x2;
                        std::memcpy(&x2, xr[t] + kBf16x16Chunk * c + 2 * (kk + s), 4);
                        acc[s][t] = _mm512_dpbf16_ps(acc[s][t], (__m512bh)_mm512_set1_epi32(x2), wv);
                    }
                }
            }
        }
        for (int t = 0; t < TT; ++t) {
            __m512 sum = acc[0][t];
            for (int s = 1; s < kChains; ++s) sum = _mm512_add_ps(sum, acc[s][t]);
            _mm512_storeu_ps(y + (size_t)t * ldy, sum);
        }
    }
};

}  // namespace

KTLAB_AVX512 void q8_0x16_gemm_avx512(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                                      float* y, size_t ldy) {
    const int nb = k / QK8_0;
    OffsetActs a;
    if (x.packed) {
        a = offset_acts_at(x.packed, m, k);
    } else {
        thread_local std::vector<uint8_t> buf;
        if (buf.size() < q8_0x16_pack_bytes_avx512(m, k)) buf.resize(q8_0x16_pack_bytes_avx512(m, k));
        offset_activations(x, m, k, buf.data());
        a = offset_acts_at(buf.data(), m, k);
    }
    for (int r0 = 0; r0 < n; r0 += kQ8x16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; j += kTokenTile) {
            const int tt = m - j < kTokenTile ? m - j : kTokenTile;
            run_token_tile<Q8x16Tile>(tt, std::make_integer_sequence<int, kTokenTile>{}, group, nb,
                                      a.q + (size_t)j * k, a.d + (size_t)j * nb, k, y + (size_t)j * ldy + r0, ldy);
        }
    }
}

KTLAB_AVX512BF16 void bf16x16_gemm_avx512bf16(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x,
                                              int m, float* y, size_t ldy) {
    for (int r0 = 0; r0 < n; r0 += kQ8x16Rows) {
        const uint16_t* group = reinterpret_cast<const uint16_t*>(w + (size_t)r0 * row_bytes);
        for (int j = 0; j < m; j += kTokenTile) {
            const int tt = m - j < kTokenTile ? m - j : kTokenTile;
            const uint16_t* xr[kTokenTile];
            for (int t = 0; t < tt; ++t) xr[t] = reinterpret_cast<const uint16_t*>(x.row(j + t));
            run_token_tile<Bf16x16Tile>(tt, std::make_integer_sequence<int, kTokenTile>{}, group, k,
                                        (const uint16_t* const*)xr, y + (size_t)j * ldy + r0, ldy);
        }
    }
}

KTLAB_GEMM_BY_ROWS(q8_0_gemm_avx512, q8_0_dot_avx512)
KTLAB_GEMM_BY_ROWS(bf16_gemm_avx512, bf16_dot_avx512)
KTLAB_GEMM_BY_ROWS(bf16_gemm_avx512bf16, bf16_dot_avx512bf16)

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
void q8_0_gemv_rows_avx512(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, float* y,
                           int r0, int r1) {
    q8_0_gemv_rows_scalar(w, row_bytes, xq, nb, y, r0, r1);
}
KTLAB_GEMM_DECL(q8_0_gemm_avx512) { q8_0_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0_gemm_rows_avx512(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m, float* y,
                           size_t ldy, int r0, int r1) {
    q8_0_gemm_rows_scalar(w, row_bytes, xq, nb, m, y, ldy, r0, r1);
}
KTLAB_GEMM_DECL(q8_0x16_gemm_avx512) { q8_0x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0x16_pack_avx512(const ActRows&, int, int, uint8_t*) {}
size_t q8_0x16_pack_bytes_avx512(int, int) { return 0; }
void quantize_row_q8_act_avx512(const float* x, block_q8_act* y, int64_t k) { quantize_row_q8_act(x, y, k); }
void quantize_row_q8_K_avx512(const float* x, block_q8_K* y, int64_t k) { quantize_row_q8_K(x, y, k); }
KTLAB_GEMM_DECL(bf16x16_gemm_avx512bf16) { bf16x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16_gemm_avx512) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16_gemm_avx512bf16) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

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

// 16 int32 partial sums of w . x (64 int8 products). vpdpbusd wants u8 x s8, so it gets
// |w| (u8, -128 -> 128) and x * sign(w); exact, |partial| <= 4 * 128 * 127.
KTLAB_AVX512 inline __m512i dot64_i8_vnni(__m512i w, __m512i x) {
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i sx = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sx);
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

KTLAB_AVX512 inline float block_scale(const block_q8_0& wb, const block_q8_act& xb) {
    return _cvtsh_ss(wb.d) * xb.d;
}

}  // namespace

// One row: blocks in pairs through 512-bit VNNI, an odd last block through 256-bit VNNI.
KTLAB_AVX512 float q8_0_dot_row_avx512(const block_q8_0* wr, const block_q8_act* xq, int nb) {
    __m512 acc0 = _mm512_setzero_ps();
    __m512 acc1 = _mm512_setzero_ps();
    int b = 0;
    for (; b + 3 < nb; b += 4) {
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 128, _MM_HINT_T0);
        const __m512i p0 = dot64_i8_vnni(load_2x32(wr[b].qs, wr[b + 1].qs), load_2x32(xq[b].qs, xq[b + 1].qs));
        const __m512i p1 =
            dot64_i8_vnni(load_2x32(wr[b + 2].qs, wr[b + 3].qs), load_2x32(xq[b + 2].qs, xq[b + 3].qs));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0),
                               scales_2(block_scale(wr[b], xq[b]), block_scale(wr[b + 1], xq[b + 1])), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1),
                               scales_2(block_scale(wr[b + 2], xq[b + 2]), block_scale(wr[b + 3], xq[b + 3])),
                               acc1);
    }
    for (; b + 1 < nb; b += 2) {
        const __m512i p0 = dot64_i8_vnni(load_2x32(wr[b].qs, wr[b + 1].qs), load_2x32(xq[b].qs, xq[b + 1].qs));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0),
                               scales_2(block_scale(wr[b], xq[b]), block_scale(wr[b + 1], xq[b + 1])), acc0);
    }
    float tail = 0.0f;
    if (b < nb) {
        const __m256i p = dot32_i8_vnni(_mm256_loadu_si256((const __m256i*)wr[b].qs),
                                        _mm256_loadu_si256((const __m256i*)xq[b].qs));
        const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(block_scale(wr[b], xq[b])));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        tail = _mm_cvtss_f32(s);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail;
}

KTLAB_AVX512 void q8_0_gemv_rows_avx512(const uint8_t* w, size_t row_bytes, const block_q8_act* xq,
                                        int nb, float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        y[r] = q8_0_dot_row_avx512(reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes), xq, nb);
    }
}

KTLAB_AVX512 float q8_0_dot_avx512(const uint8_t* w, const uint8_t* x, int k) {
    return q8_0_dot_row_avx512(reinterpret_cast<const block_q8_0*>(w), reinterpret_cast<const block_q8_act*>(x),
                               k / QK8_0);
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
KTLAB_GEMM_DECL(bf16_gemm_avx512) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16_gemm_avx512bf16) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

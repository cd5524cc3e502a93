// AVX2 + FMA kernels. Twins in moe_generic.cpp. Compiled with per-function target
// attributes; only called after isa.cpp found avx2, fma and f16c.
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

// 8 int32 partial sums of 32 int8 x int8 products (exact: |partial| <= 4 * 128 * 127).
KTLAB_AVX2 inline __m256i dot32_i8_avx2(__m256i w, __m256i x) {
    const __m256i aw = _mm256_sign_epi8(w, w);  // |w| as u8 (-128 -> 128)
    const __m256i sx = _mm256_sign_epi8(x, w);  // x * sign(w)
    const __m256i p16 = _mm256_maddubs_epi16(aw, sx);  // pairs, |.| <= 2*128*127 < 32767
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

}  // namespace

KTLAB_AVX2 void q8_0_gemv_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb,
                                    float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const block_q8_0* wr = reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes);
        __m256 acc0 = _mm256_setzero_ps();
        __m256 acc1 = _mm256_setzero_ps();
        int b = 0;
        for (; b + 1 < nb; b += 2) {
            _mm_prefetch((const char*)(wr + b) + kPrefetchBytes, _MM_HINT_T0);
            _mm_prefetch((const char*)(wr + b) + kPrefetchBytes + 64, _MM_HINT_T0);
            const __m256i p0 = dot32_i8_avx2(_mm256_loadu_si256((const __m256i*)wr[b].qs),
                                             _mm256_loadu_si256((const __m256i*)xq[b].qs));
            const __m256i p1 = dot32_i8_avx2(_mm256_loadu_si256((const __m256i*)wr[b + 1].qs),
                                             _mm256_loadu_si256((const __m256i*)xq[b + 1].qs));
            const float s0 = _cvtsh_ss(wr[b].d) * xq[b].d;
            const float s1 = _cvtsh_ss(wr[b + 1].d) * xq[b + 1].d;
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s1), acc1);
        }
        if (b < nb) {
            const __m256i p0 = dot32_i8_avx2(_mm256_loadu_si256((const __m256i*)wr[b].qs),
                                             _mm256_loadu_si256((const __m256i*)xq[b].qs));
            const float s0 = _cvtsh_ss(wr[b].d) * xq[b].d;
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0), acc0);
        }
        y[r] = hsum_ps_avx2(_mm256_add_ps(acc0, acc1));
    }
}

}  // namespace ktlab

#else  // not x86: never selected (isa.cpp reports no AVX2), defined so the table links

namespace ktlab {
void q8_0_gemv_rows_avx2(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, float* y,
                         int r0, int r1) {
    q8_0_gemv_rows_scalar(w, row_bytes, xq, nb, y, r0, r1);
}
}  // namespace ktlab

#endif

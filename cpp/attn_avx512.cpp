// AVX-512 head kernel of the paged decode attention (attention.h). Twin: attn_head_scalar.
// hd % 16 == 0. Exp is a Cephes-style polynomial (relative error ~2e-7 on the softmax inputs,
// which are <= 0), vectorized with masked tails.
#include <cmath>

#include "attention.h"

#if KTLAB_X86
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define KTLAB_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

namespace ktlab {

namespace {

KTLAB_AVX512 inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
    const __m512 fx = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

KTLAB_AVX512 inline __mmask16 tail_mask(int left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// The scores of GB query heads of one group against one key row: each head's dot is the same
// chain of operations as on its own (a multiply, then fused multiply-adds over the row, then
// one reduction), so the same bits; the GB chains run side by side instead of waiting on one
// another, and each 16 floats of the key row are loaded once for all of them.
constexpr int kScoreHeads = 8;

template <int GB>
KTLAB_AVX512 inline void head_scores(const float* q, int g0, int hd, const float* kr, float scale, int s, int len,
                                     float* scores) {
    const int nv = hd / 16;
    const float* qg = q + (size_t)g0 * hd;
    __m512 acc[GB];
    const __m512 k0 = _mm512_loadu_ps(kr);
    for (int g = 0; g < GB; ++g) acc[g] = _mm512_mul_ps(_mm512_loadu_ps(qg + (size_t)g * hd), k0);
    for (int c = 1; c < nv; ++c) {
        const __m512 kc = _mm512_loadu_ps(kr + 16 * c);
        for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + (size_t)g * hd + 16 * c), kc, acc[g]);
    }
    for (int g = 0; g < GB; ++g) scores[(size_t)(g0 + g) * len + s] = _mm512_reduce_add_ps(acc[g]) * scale;
}

}  // namespace

KTLAB_AVX512 void attn_head_avx512(const float* q, int group, int hd, const float* k, const float* v,
                                   const int32_t* table, int page, int len, float scale, float* scores, float* out) {
    const int nv = hd / 16;
    for (int s = 0; s < len; ++s) {
        const float* kr = paged_row(k, table, page, s, hd);
        for (int g0 = 0; g0 < group; g0 += kScoreHeads) {
            switch (group - g0 < kScoreHeads ? group - g0 : kScoreHeads) {
                case 1: head_scores<1>(q, g0, hd, kr, scale, s, len, scores); break;
                case 2: head_scores<2>(q, g0, hd, kr, scale, s, len, scores); break;
                case 3: head_scores<3>(q, g0, hd, kr, scale, s, len, scores); break;
                case 4: head_scores<4>(q, g0, hd, kr, scale, s, len, scores); break;
                case 5: head_scores<5>(q, g0, hd, kr, scale, s, len, scores); break;
                case 6: head_scores<6>(q, g0, hd, kr, scale, s, len, scores); break;
                case 7: head_scores<7>(q, g0, hd, kr, scale, s, len, scores); break;
                default: head_scores<8>(q, g0, hd, kr, scale, s, len, scores); break;
            }
        }
    }
    for (int g = 0; g < group; ++g) {
        float* sc = scores + (size_t)g * len;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int s = 0; s < len; s += 16) {
            const __mmask16 t = tail_mask(len - s);
            mx = _mm512_mask_max_ps(mx, t, mx, _mm512_maskz_loadu_ps(t, sc + s));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int s = 0; s < len; s += 16) {
            const __mmask16 t = tail_mask(len - s);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, sc + s), m));
            _mm512_mask_storeu_ps(sc + s, t, e);
            sum = _mm512_mask_add_ps(sum, t, sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int s = 0; s < len; s += 16) {
            const __mmask16 t = tail_mask(len - s);
            _mm512_mask_storeu_ps(sc + s, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, sc + s), inv));
        }
        float* og = out + (size_t)g * hd;
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(og + 16 * c, _mm512_setzero_ps());
    }
    for (int s = 0; s < len; ++s) {
        const float* vr = paged_row(v, table, page, s, hd);
        for (int g = 0; g < group; ++g) {
            const __m512 p = _mm512_set1_ps(scores[(size_t)g * len + s]);
            float* og = out + (size_t)g * hd;
            for (int c = 0; c < nv; ++c) {
                const __m512 o = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * c), _mm512_loadu_ps(og + 16 * c));
                _mm512_storeu_ps(og + 16 * c, o);
            }
        }
    }
}

}  // namespace ktlab

#else  // not x86: never selected

namespace ktlab {
void attn_head_avx512(const float* q, int group, int hd, const float* k, const float* v, const int32_t* table,
                      int page, int len, float scale, float* scores, float* out) {
    attn_head_scalar(q, group, hd, k, v, table, page, len, scale, scores, out);
}
}  // namespace ktlab

#endif

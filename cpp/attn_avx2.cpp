// AVX2 + FMA head kernel of the paged decode attention (attention.h). Twin: attn_head_scalar.
// hd % 8 == 0. Exp: the Cephes-style polynomial of attn_avx512.cpp, 8 lanes; tails scalar.
#include <cmath>

#include "attention.h"

#if KTLAB_X86
#include <immintrin.h>

#define KTLAB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ktlab {

namespace {

KTLAB_AVX2 inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

KTLAB_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

KTLAB_AVX2 inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

}  // namespace

KTLAB_AVX2 void attn_head_avx2(const float* q, int group, int hd, const float* k, const float* v,
                               const int32_t* table, int page, int len, float scale, float* scores, float* out) {
    const int nv = hd / 8;
    for (int s = 0; s < len; ++s) {
        const float* kr = paged_row(k, table, page, s, hd);
        for (int g = 0; g < group; ++g) {
            const float* qg = q + (size_t)g * hd;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(kr));
            for (int c = 1; c < nv; ++c) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), _mm256_loadu_ps(kr + 8 * c), acc);
            }
            scores[(size_t)g * len + s] = hsum(acc) * scale;
        }
    }
    const int vec_end = len / 8 * 8;
    for (int g = 0; g < group; ++g) {
        float* sc = scores + (size_t)g * len;
        __m256 mxv = _mm256_set1_ps(-INFINITY);
        for (int s = 0; s < vec_end; s += 8) mxv = _mm256_max_ps(mxv, _mm256_loadu_ps(sc + s));
        float mx = hmax(mxv);
        for (int s = vec_end; s < len; ++s) mx = sc[s] > mx ? sc[s] : mx;
        const __m256 m = _mm256_set1_ps(mx);
        __m256 sumv = _mm256_setzero_ps();
        for (int s = 0; s < vec_end; s += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + s), m));
            _mm256_storeu_ps(sc + s, e);
            sumv = _mm256_add_ps(sumv, e);
        }
        float sum = hsum(sumv);
        for (int s = vec_end; s < len; ++s) {
            sc[s] = std::exp(sc[s] - mx);
            sum += sc[s];
        }
        const float inv = 1.0f / sum;
        for (int s = 0; s < len; ++s) sc[s] *= inv;
        float* og = out + (size_t)g * hd;
        for (int c = 0; c < nv; ++c) _mm256_storeu_ps(og + 8 * c, _mm256_setzero_ps());
    }
    for (int s = 0; s < len; ++s) {
        const float* vr = paged_row(v, table, page, s, hd);
        for (int g = 0; g < group; ++g) {
            const __m256 p = _mm256_set1_ps(scores[(size_t)g * len + s]);
            float* og = out + (size_t)g * hd;
            for (int c = 0; c < nv; ++c) {
                const __m256 o = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c), _mm256_loadu_ps(og + 8 * c));
                _mm256_storeu_ps(og + 8 * c, o);
            }
        }
    }
}

}  // namespace ktlab

#else  // not x86: never selected

namespace ktlab {
void attn_head_avx2(const float* q, int group, int hd, const float* k, const float* v, const int32_t* table,
                    int page, int len, float scale, float* scores, float* out) {
    attn_head_scalar(q, group, hd, k, v, table, page, len, scale, scores, out);
}
}  // namespace ktlab

#endif

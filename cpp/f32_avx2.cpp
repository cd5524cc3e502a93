// AVX2 + FMA fp32 dot product (f32_matmul.h). Twin: f32_dot_scalar.
#include "f32_matmul.h"

#if KTLAB_X86
#include <immintrin.h>

namespace ktlab {

__attribute__((target("avx2,fma"))) float f32_dot_avx2(const float* w, const float* x, int k) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    }
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(s);
    for (; i < k; ++i) sum += w[i] * x[i];
    return sum;
}

}  // namespace ktlab

#else
namespace ktlab {
float f32_dot_avx2(const float* w, const float* x, int k) { return f32_dot_scalar(w, x, k); }
}  // namespace ktlab
#endif

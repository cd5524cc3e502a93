// AVX-512 fp32 dot product (f32_matmul.h). Twin: f32_dot_scalar.
#include "f32_matmul.h"

#if KTLAB_X86
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace ktlab {

__attribute__((target("avx2,fma,avx512f"))) float f32_dot_avx512(const float* w, const float* x, int k) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; i < k; ++i) sum += w[i] * x[i];
    return sum;
}

__attribute__((target("avx2,fma,avx512f"))) void f32_dot4_avx512(const float* w, const float* x0, const float* x1,
                                                                  const float* x2, const float* x3, int k, float* out) {
    const float* x[4] = {x0, x1, x2, x3};
    __m512 acc0[4], acc1[4];
    for (int t = 0; t < 4; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m512 w0 = _mm512_loadu_ps(w + i), w1 = _mm512_loadu_ps(w + i + 16);
        for (int t = 0; t < 4; ++t) {
            acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[t] + i), acc0[t]);
            acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[t] + i + 16), acc1[t]);
        }
    }
    for (int t = 0; t < 4; ++t) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
        for (int j = i; j < k; ++j) sum += w[j] * x[t][j];
        out[t] = sum;
    }
}

}  // namespace ktlab

#else
namespace ktlab {
float f32_dot_avx512(const float* w, const float* x, int k) { return f32_dot_scalar(w, x, k); }
void f32_dot4_avx512(const float* w, const float* x0, const float* x1, const float* x2, const float* x3, int k,
                     float* out) {
    const float* x[4] = {x0, x1, x2, x3};
    for (int t = 0; t < 4; ++t) out[t] = f32_dot_scalar(w, x[t], k);
}
}  // namespace ktlab
#endif

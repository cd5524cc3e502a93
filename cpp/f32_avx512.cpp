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

}  // namespace ktlab

#else
namespace ktlab {
float f32_dot_avx512(const float* w, const float* x, int k) { return f32_dot_scalar(w, x, k); }
}  // namespace ktlab
#endif

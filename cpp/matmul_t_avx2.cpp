// The transposed products' axpy on AVX2 + FMA (twin: axpy_scalar; see matmul_t.h).
#include "matmul_t.h"

#if KTLAB_X86
#include <immintrin.h>

namespace ktlab {

__attribute__((target("avx2,fma"))) void axpy_avx2(float a, const float* x, float* y, int n) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
    axpy_scalar(a, x + i, y + i, n - i);
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the driver links

namespace ktlab {
void axpy_avx2(float a, const float* x, float* y, int n) { axpy_scalar(a, x, y, n); }
}  // namespace ktlab

#endif

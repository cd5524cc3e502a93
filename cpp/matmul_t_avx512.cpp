// The transposed products' axpy on AVX-512F (twin: axpy_scalar; see matmul_t.h).
#include "matmul_t.h"

#if KTLAB_X86
#include <immintrin.h>

namespace ktlab {

__attribute__((target("avx512f,fma"))) void axpy_avx512(float a, const float* x, float* y, int n) {
    const __m512 av = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    }
    axpy_scalar(a, x + i, y + i, n - i);
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the driver links

namespace ktlab {
void axpy_avx512(float a, const float* x, float* y, int n) { axpy_scalar(a, x, y, n); }
}  // namespace ktlab

#endif

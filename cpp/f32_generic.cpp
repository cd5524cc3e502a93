// Dense fp32 matmul: the driver and the scalar twin of the SIMD dot products (f32_matmul.h).
#include "f32_matmul.h"
#include "threadpool.h"

namespace ktlab {

float f32_dot_scalar(const float* w, const float* x, int k) {
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) sum += w[i] * x[i];
    return sum;
}

void f32_matmul(const float* w, const float* x, float* y, int64_t n, int64_t k, int64_t m, Isa isa, int threads) {
    if (n <= 0 || m <= 0) return;
    float (*dot)(const float*, const float*, int) = f32_dot_scalar;
    if (isa == Isa::avx512 || isa == Isa::amx) dot = f32_dot_avx512;
    else if (isa == Isa::avx2) dot = f32_dot_avx2;
    constexpr int kRows = 64, kTokens = 64;
    const int row_tasks = (int)((n + kRows - 1) / kRows);
    const int n_tasks = row_tasks * (int)((m + kTokens - 1) / kTokens);
    auto task = [&](int t) {
        const int64_t r0 = (int64_t)(t % row_tasks) * kRows, j0 = (int64_t)(t / row_tasks) * kTokens;
        const int64_t r1 = r0 + kRows < n ? r0 + kRows : n, j1 = j0 + kTokens < m ? j0 + kTokens : m;
        for (int64_t r = r0; r < r1; ++r) {
            for (int64_t j = j0; j < j1; ++j) y[j * n + r] = dot(w + r * k, x + j * k, (int)k);
        }
    };
    run_parallel(n_tasks, threads, task);
}

}  // namespace ktlab

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
        const bool four = isa == Isa::avx512 || isa == Isa::amx;  // f32_dot4_avx512: the bits of four single dots
        for (int64_t r = r0; r < r1; ++r) {
            const float* wr = w + r * k;
            int64_t j = j0;
            for (; four && j + 4 <= j1; j += 4) {
                float out[4];
                f32_dot4_avx512(wr, x + j * k, x + (j + 1) * k, x + (j + 2) * k, x + (j + 3) * k, (int)k, out);
                for (int t = 0; t < 4; ++t) y[(j + t) * n + r] = out[t];
            }
            for (; j < j1; ++j) y[j * n + r] = dot(wr, x + j * k, (int)k);
        }
    };
    run_parallel(n_tasks, threads, task);
}

}  // namespace ktlab

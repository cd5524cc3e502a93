// Dense fp32 matmul whose rows are batch-independent: Y[m, n] = X[m, k] . W[n, k]^T with each
// y[j, i] one dot product of W row i and X row j, computed the same way for any m and thread
// count (BLAS picks kernels by shape, so a token's router logits would change with its batch).
// For the small fp32 matrices of a model (MoE routers): a few MB, read once per call.
#pragma once

#include <cstdint>

#include "isa.h"

namespace ktlab {

// float Dot(w, x, k): one row of W against one row of X.
float f32_dot_scalar(const float* w, const float* x, int k);
float f32_dot_avx2(const float* w, const float* x, int k);
float f32_dot_avx512(const float* w, const float* x, int k);
// Four rows of X against one row of W, each the same operations in the same order as
// f32_dot_avx512 (so the same bits), interleaved: one load of W serves four tokens and the
// eight accumulator chains hide the FMA latency a single dot waits on.
void f32_dot4_avx512(const float* w, const float* x0, const float* x1, const float* x2, const float* x3, int k,
                     float* out);

// Tasks of (64 rows of W, 64 rows of X) on the pool. The caller validates shapes.
void f32_matmul(const float* w, const float* x, float* y, int64_t n, int64_t k, int64_t m, Isa isa, int threads);

}  // namespace ktlab

// Transposed products for backward passes: dx[m, K] = dy[m, N] . W[N, K] with W in a block format
// (the raw GGUF rows of a frozen weight; y = x . W^T forward), so training gets input gradients
// through quantized experts without dequantizing them whole.
//
// Tasks own column chunks of kChunkValues (whole blocks of every format); a task dequantizes each
// row's slice once (scalar, ggml's dequantizers) and adds dy[j, n] * row into dx[j] for every token
// with the path's axpy, rows in order. Every dx element is one chain of fused multiply-adds in row
// order (std::fma in the scalar twin), so every path and thread count gives the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"

namespace ktlab {

constexpr int kMatmulTChunk = 256;  // columns per task (whole blocks of 32 and of 256)

// out[0, k1 - k0) = row's values k0 .. k1-1 (block-aligned) as float32, as ggml dequantizes them.
void dequantize_row_range(WFormat f, const uint8_t* row, int64_t k0, int64_t k1, float* out);

// y[i] = fma(a, x[i], y[i]) for i < n: scalar twin and the SIMD paths.
void axpy_scalar(float a, const float* x, float* y, int n);
void axpy_avx2(float a, const float* x, float* y, int n);
void axpy_avx512(float a, const float* x, float* y, int n);

// dx [m, k] = dy [m, n] . W [n, k] (W: n raw rows of `row_bytes`, format f, k whole blocks).
void matmul_t(WFormat f, const uint8_t* w, size_t row_bytes, int64_t n, int64_t k, const float* dy, int64_t m,
              float* dx, Isa isa, int threads);

}  // namespace ktlab

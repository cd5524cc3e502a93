// Transposed products for backward passes: dx[m, K] = dy[m, N] . W[N, K] with W in a block format
// (the raw GGUF rows of a frozen weight; y = x . W^T forward), so training gets input gradients
// through quantized experts without dequantizing them whole.
//
// Tasks own column chunks of kMatmulTChunk values (K-quants) or half that (smaller blocks). A task takes the
// rows in tiles of kMatmulTRows: it dequantizes the tile's slices once (ggml's dequantizers), then
// per token and column sums the tile's rows as one chain of fused multiply-adds from zero, held in
// registers, and adds that partial sum to dx. Every dx element is computed in that same order on every
// path (std::fma in the scalar twin) and thread count, so they all give the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"

namespace ktlab {

constexpr int kMatmulTChunk = 256;  // columns per task (whole blocks of 32 and of 256)
constexpr int kMatmulTRows = 32;    // rows per tile (a tile's slices: 32 KiB of float32)

// out[0, k1 - k0) = row's values k0 .. k1-1 (block-aligned) as float32, as ggml dequantizes them.
void dequantize_row_range(WFormat f, const uint8_t* row, int64_t k0, int64_t k1, float* out);

// Q8_0 blocks b0 .. b1-1 of a raw row as float32 (d * q, one rounding: the scalar dequantizer's bits).
void dequant_q8_0_avx2(const uint8_t* row, int64_t b0, int64_t b1, float* out);
void dequant_q8_0_avx512(const uint8_t* row, int64_t b0, int64_t b1, float* out);

// dx[j, c] += sum over r < rows of dy[j, r] * w[r, c] (one fma chain from 0 per element, r in order)
// for j < m, c < len; w: rows of `ldw` floats, dy rows `ldy` apart, dx rows `ldx` apart.
using tile_fn = void (*)(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                         int64_t ldx, int len);
void matmul_t_tile_scalar(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                          int64_t ldx, int len);
void matmul_t_tile_avx2(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                        int64_t ldx, int len);
void matmul_t_tile_avx512(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                          int64_t ldx, int len);

// dx [m, k] = sum over parts p of dy[p] [m, n] . W[p] [n, k] (each W[p]: n raw rows of `row_bytes`,
// format f, k whole blocks; all of one shape), in one pass (an expert's gate and up: one task set,
// one zeroing; part after part within each element's order).
void matmul_t_sum(WFormat f, const uint8_t* const* w, const float* const* dy, int parts, size_t row_bytes, int64_t n,
                  int64_t k, int64_t m, float* dx, Isa isa, int threads);

}  // namespace ktlab

// MXFP4 (OCP microscaling FP4, gpt-oss's expert weights), laid out like ggml's block_mxfp4, and
// its repacked 16-row layout ("MXFP4x16"). Scalar twins and the repack are in mxfp4_generic.cpp,
// the SIMD kernels in mxfp4_avx2.cpp and mxfp4_avx512.cpp.
//
//   raw block (17 bytes, 32 values): u8 e (E8M0 exponent), u8 qs[16]; value j < 16 is the low
//   nibble of qs[j], value 16 + j the high nibble; a nibble indexes kMxfp4Values (the E2M1
//   values doubled, as ggml's kvalues_mxfp4), and x = e8m0_half(e) * kMxfp4Values[nibble] with
//   e8m0_half(e) = 2^(e - 128) (half the E8M0 scale, which undoes the doubling).
//
//   MXFP4x16 (20 bytes a row and block; raw 17): per group of 16 rows, per block b, 320 bytes
//   at 320 * b:
//     0    quants: byte 64 * kk + 4 * n + p (kk < 4, n < 16, p < 4): low nibble = row n's value
//          4 * kk + p, high nibble = row n's value 16 + 4 * kk + p. Unpacked through a table,
//          the low nibbles of a 64-byte chunk are exactly Q8_0x16's chunk kk, the high nibbles
//          its chunk kk + 4 (quant.h): one zmm of 16 rows x 4 int8.
//     256  16 fp32 scales: row n's e8m0_half(e).
//
// Activations are block_q8_act (quant.h), as for Q8_0. Every path computes per row, token and
// block the exact int32 dot of the 32 table values with the activation quants, then
//     sum = fma((float)isum, scale * d_x, sum)
// blocks in order (std::fma in the twins, the same single rounding as a vector FMA), so every
// path, packed or raw, alone or batched, gives the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "isa.h"
#include "quant.h"

namespace ktlab {

constexpr int QK_MXFP4 = 32;
constexpr int kMxfp4BlockBytes = 17;
constexpr int kMxfp4x16Bytes = 20;         // packed bytes a row and block
constexpr int kMxfp4x16QuantBytes = 256;   // quant bytes of a 16-row group's block
constexpr int kMxfp4x16BlockBytes = 320;   // 16 rows' block: quants, then 16 fp32 scales
constexpr int8_t kMxfp4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2^(e - 128) as ggml_e8m0_to_fp32_half: subnormal for e < 2.
inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    return fp32_from_bits(bits);
}

// The SIMD kernels take the table values + 12 as unsigned bytes (for u8 x s8 products) and
// subtract 12 * (sum of the block's activation quants), exact in int32: these sums, per
// activation row j and block b at out[j * nb + b].
constexpr int kMxfp4Offset = 12;
inline void mxfp4_act_sums(const ActRows& x, int m, int nb, int32_t* out) {
    for (int j = 0; j < m; ++j) {
        const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x.row(j));
        for (int b = 0; b < nb; ++b) {
            int32_t s = 0;
            for (int i = 0; i < QK_MXFP4; ++i) s += xb[b].qs[i];
            out[(size_t)j * nb + b] = kMxfp4Offset * s;
        }
    }
}

// The loop both SIMD kernels share: activation sums once, then for each 16-row group and each tile of
// up to TokenTile tokens Tile<tt>::run(group, nb, activation rows, their sums, y at the tile, ldy).
// A token's arithmetic in Tile never depends on tt, so its result never depends on m.
template <template <int> class Tile, int TokenTile, int... TT>
inline void mxfp4x16_run_tile(int tt, std::integer_sequence<int, TT...>, const uint8_t* group, int nb,
                              const block_q8_act* const* x, const int32_t* sums, float* y, size_t ldy) {
    ((tt == TT + 1 ? Tile<TT + 1>::run(group, nb, x, sums, y, ldy) : void()), ...);
}

template <template <int> class Tile, int TokenTile>
inline void mxfp4x16_gemm(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                          size_t ldy) {
    const int nb = k / QK_MXFP4;
    thread_local std::vector<int32_t> sums;
    if (sums.size() < (size_t)m * nb) sums.resize((size_t)m * nb);
    mxfp4_act_sums(x, m, nb, sums.data());
    for (int r0 = 0; r0 < n; r0 += 16) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; j += TokenTile) {
            const int tt = m - j < TokenTile ? m - j : TokenTile;
            const block_q8_act* xr[TokenTile];
            for (int t = 0; t < tt; ++t) xr[t] = reinterpret_cast<const block_q8_act*>(x.row(j + t));
            mxfp4x16_run_tile<Tile, TokenTile>(tt, std::make_integer_sequence<int, TokenTile>{}, group, nb, xr,
                                               sums.data() + (size_t)j * nb, y + (size_t)j * ldy + r0, ldy);
        }
    }
}

// rows % 16 == 0, k % 32 == 0; out holds rows * k / 32 * 20 bytes.
void repack_mxfp4x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

}  // namespace ktlab

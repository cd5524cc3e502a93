// K-quant weights (Q4_K, Q5_K, Q6_K) repacked once at load for int8 dot products, 16 rows at a
// time ("Q4_Kx16", "Q5_Kx16", "Q6_Kx16"): the layouts, their repack functions and the helpers
// every path's kernels share. The scalar twins and the repack functions are in
// kquant_generic.cpp, the SIMD kernels in kquant_avx2.cpp and kquant_avx512.cpp.
//
// A packed matrix is groups of 16 consecutive rows; a group is nb = K / 256 super-blocks of
// 16 * packed_bytes bytes, super-block b at 16 * packed_bytes * b, so packed row r (r % 16 == 0)
// starts at r * packed_row_bytes. Within a super-block the rows' quants sit side by side in
// chunks of 4 bytes per row (64 bytes for 16 rows: one zmm, or two ymm of 8 rows), so one load
// of weights feeds 16 (8) rows' dot products against 4 bytes of activation broadcast, and no
// row ever needs a horizontal sum. Scales and mins are unpacked to one byte each, rows side by
// side, so a kernel widens them with one instruction.
//
//   Q4_Kx16 (148 bytes a row and super-block; raw 144): at byte offset
//     0     qs: chunk (j < 4, c < 8) at 64 * (8j + c): byte 4n + p = row n's qs[32j + 4c + p]
//           (its low nibble is value 64j + 4c + p, of sub-block 2j; its high nibble value
//           64j + 32 + 4c + p, of sub-block 2j + 1)
//     2048  sc[s * 16 + n]: row n's 6-bit scale of sub-block s (s < 8)
//     2176  mn[s * 16 + n]: row n's 6-bit min of sub-block s
//     2304  d[n] (fp16), 2336 dmin[n] (fp16)
//   Q5_Kx16 (180 bytes; raw 176): qs as Q4_Kx16, then
//     2048  qh: chunk c (< 8) at 2048 + 64c: byte 4n + p = row n's qh[4c + p] (bit 2j: the fifth
//           bit of value 64j + 4c + p; bit 2j + 1: of value 64j + 32 + 4c + p)
//     2560  sc, 2688 mn, 2816 d, 2848 dmin (as Q4_Kx16)
//   Q6_Kx16 (210 bytes, as raw): per half h (< 2) and chunk c (< 8), at 1536h + 192c:
//     +0    a: byte 4n + p = row n's ql[64h + 4c + p] (low nibble: quarter 0, value
//           128h + 4c + p; high nibble: quarter 2, value 128h + 64 + 4c + p)
//     +64   b: row n's ql[64h + 32 + 4c + p] (quarters 1 and 3: values 128h + 32 + 4c + p and
//           128h + 96 + 4c + p)
//     +128  h: row n's qh[32h + 4c + p] (bits 2Q, 2Q + 1: the high bits of quarter Q's value)
//     3072  scale pairs: pair i (< 8) at 3072 + 32i: byte 2n + q = row n's scales[2i + q]
//     3328  d[n] (fp16)
//   Quarter Q of chunk c in half h is sub-block 8h + 2Q + c / 4: pair 4h + Q, entry c / 4.
//
// Every path computes, per row, token and super-block, the same exact int32 sums as the raw
// scalar kernels (moe_generic.cpp), then the same fp32 operations in the same order:
//   Q4_K, Q5_K: sum += d_x * (d * (float)isum - dmin * (float)summ)
//   Q6_K:       sum += (d * d_x) * (float)(isum - 32 * offset)
// so packed and raw, scalar and SIMD, alone and batched give the same bits (-ffp-contract=off).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "isa.h"
#include "quant.h"

namespace ktlab {

constexpr int kKx16Rows = 16;
constexpr int kQ4Kx16Bytes = 148;  // packed bytes a row and super-block
constexpr int kQ5Kx16Bytes = 180;
constexpr int kQ6Kx16Bytes = 210;

// Byte offsets inside one packed super-block of a 16-row group.
struct Q45Kx16Offsets {
    int qh, sc, mn, d, dmin;
};
constexpr Q45Kx16Offsets kQ4Kx16At{0, 2048, 2176, 2304, 2336};
constexpr Q45Kx16Offsets kQ5Kx16At{2048, 2560, 2688, 2816, 2848};
constexpr int kQ6Kx16HalfBytes = 1536;
constexpr int kQ6Kx16ChunkBytes = 192;
constexpr int kQ6Kx16Scales = 3072;
constexpr int kQ6Kx16D = 3328;

// rows % 16 == 0, k % 256 == 0; out holds rows * k / 256 * packed bytes.
void repack_q4_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);
void repack_q5_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);
void repack_q6_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

// Tile<tt>::run(args...) for a run-time tt in [1, MaxTokens] (each tile size its own unrolled code).
template <template <int> class Tile, int MaxTokens, int... TT, class... Args>
inline void run_kx16_tile(int tt, std::integer_sequence<int, TT...>, const Args&... args) {
    ((tt == TT + 1 ? Tile<TT + 1>::run(args...) : void()), ...);
}

// For each 16-row group of the packed matrix and each tile of up to MaxTokens tokens:
// fn(group, first token, tile size, the tile's activation rows).
template <int MaxTokens, class Fn>
inline void for_kx16_tiles(const uint8_t* w, size_t row_bytes, int n, const ActRows& x, int m, Fn&& fn) {
    for (int r0 = 0; r0 < n; r0 += kKx16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; j += MaxTokens) {
            const int tt = m - j < MaxTokens ? m - j : MaxTokens;
            const block_q8_K* xr[MaxTokens];
            for (int t = 0; t < tt; ++t) xr[t] = reinterpret_cast<const block_q8_K*>(x.row(j + t));
            fn(r0, group, j, tt, (const block_q8_K* const*)xr);
        }
    }
}

// The loop every packed K-quant kernel shares: 16-row groups, each against the tokens in tiles of
// up to MaxTokens, Tile<tt>::run(group, nb, activation rows, y at the tile, ldy) per tile. A
// token's arithmetic in Tile never depends on tt, so its result never depends on m.
template <template <int> class Tile, int MaxTokens>
inline void kx16_gemm(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                      size_t ldy) {
    const int nb = k / QK_K;
    for_kx16_tiles<MaxTokens>(w, row_bytes, n, x, m, [&](int r0, const uint8_t* group, int j, int tt,
                                                         const block_q8_K* const* xr) {
        run_kx16_tile<Tile, MaxTokens>(tt, std::make_integer_sequence<int, MaxTokens>{}, group, nb, xr,
                                       y + (size_t)j * ldy + r0, ldy);
    });
}

// Calls with many tokens: each group's quants are first unpacked to a byte each, once for all
// the tokens (Unpack::run(group, nb, out): per super-block kUnpackedBytes, 64 chunks of 64 bytes,
// chunk c's byte 4n + p = row n's unsigned quant of value 4c + p), then UTile<tt>::run(group,
// unpacked, nb, activation rows, y, ldy) multiplies: no nibble or bit work per token tile. The
// integer sums are the same, so the bits are the packed kernel's.
constexpr int kUnpackedBytes = QK_K * kKx16Rows;
template <class Unpack, template <int> class UTile, int MaxTokens>
inline void kx16_gemm_unpacked(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                               size_t ldy) {
    const int nb = k / QK_K;
    thread_local std::vector<uint8_t> unpacked;
    if (unpacked.size() < (size_t)nb * kUnpackedBytes) unpacked.resize((size_t)nb * kUnpackedBytes);
    const uint8_t* last = nullptr;
    for_kx16_tiles<MaxTokens>(w, row_bytes, n, x, m, [&](int r0, const uint8_t* group, int j, int tt,
                                                         const block_q8_K* const* xr) {
        if (group != last) Unpack::run(group, nb, unpacked.data());
        last = group;
        run_kx16_tile<UTile, MaxTokens>(tt, std::make_integer_sequence<int, MaxTokens>{}, group,
                                        (const uint8_t*)unpacked.data(), nb, xr, y + (size_t)j * ldy + r0, ldy);
    });
}

// Four activation quants as one int32 (to broadcast against 4-byte weight chunks).
inline int32_t four_quants(const int8_t* q) {
    int32_t v;
    std::memcpy(&v, q, 4);
    return v;
}

}  // namespace ktlab

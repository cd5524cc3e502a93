// AMX-INT8 tile kernels. Twins in moe_generic.cpp. Compiled with per-function target
// attributes; only called after isa.cpp found amx-tile + amx-int8, Linux granted the
// XTILEDATA permission, and the AVX-512 path is available (used for tails and scaling).
//
// Q8_0 GEMV on tiles, 16 output rows at a time, one Q8_0 block (32 values of K) per step:
//   A (tmm0) = 16 weight rows x 32 int8, read in place from the raw GGUF bytes with the row
//              stride (no repacking: tileloadd takes a stride, each row's 32 quants are
//              contiguous inside its block);
//   B (tmm1) = the activation block as 8 rows x 4 int8 (stride 4): the VNNI layout of a
//              32 x 1 matrix is just the 32 bytes in order;
//   C (tmm2) = 16 x 1 int32 = the 16 exact block dot products (tdpbssd, s8 x s8).
// C goes to memory, is converted to fp32 and scaled by d_w[row] (16 fp16 gathered) * d_x,
// and accumulated in one zmm. A GEMV has one activation column, so each tile op uses 1 of
// its 16 columns; the kernel stays memory-bound, which is what decode is anyway. The tile
// path pays off with several tokens (B with up to 16 columns), a later issue.
// Rows beyond the last full group of 16 go through the AVX-512 row kernel.
// No software prefetch here: 16 prefetches per step (one per row stream) measured slower
// than the hardware prefetcher alone (~10.5 vs ~12.5 GB/s cold, one core).
#include "isa.h"
#include "quant.h"

#if KTLAB_X86
// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define KTLAB_AMX \
    __attribute__((target("amx-tile,amx-int8,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace ktlab {

// From moe_avx512.cpp.
float q8_0_dot_row_avx512(const block_q8_0* wr, const block_q8_act* xq, int nb);

namespace {

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

constexpr int kTileRows = 16;

}  // namespace

KTLAB_AMX void q8_0_gemv_rows_amx(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb,
                                  float* y, int r0, int r1) {
    // The fp16 gather uses int32 byte offsets up to 15 rows away; absurdly long rows skip tiles.
    const bool offsets_fit = (uint64_t)row_bytes * (kTileRows - 1) <= 0x7fffffffull;
    const int n_groups = offsets_fit ? (r1 - r0) / kTileRows : 0;
    if (n_groups > 0) {
        TileConfig cfg = {};
        cfg.palette_id = 1;
        // tmm0/tmm3: A, 16 rows x 32 bytes; tmm1/tmm4: B, 8 rows x 4 bytes; tmm2/tmm5: C, 16 x 1 int32.
        const int a_tiles[2] = {0, 3}, b_tiles[2] = {1, 4}, c_tiles[2] = {2, 5};
        for (int i = 0; i < 2; ++i) {
            cfg.rows[a_tiles[i]] = kTileRows;
            cfg.colsb[a_tiles[i]] = QK8_0;
            cfg.rows[b_tiles[i]] = QK8_0 / 4;
            cfg.colsb[b_tiles[i]] = 4;
            cfg.rows[c_tiles[i]] = kTileRows;
            cfg.colsb[c_tiles[i]] = 4;
        }
        _tile_loadconfig(&cfg);

        // Byte offsets of the 16 rows' block headers relative to row 0 (for the fp16 gather).
        const __m512i row_off = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((int)row_bytes));
        alignas(64) int32_t c0[kTileRows];
        alignas(64) int32_t c1[kTileRows];
        const long stride = (long)row_bytes;

        for (int g = 0; g < n_groups; ++g) {
            const int r = r0 + g * kTileRows;
            const uint8_t* base = w + (size_t)r * row_bytes;
            __m512 acc0 = _mm512_setzero_ps();
            __m512 acc1 = _mm512_setzero_ps();
            int b = 0;
            for (; b + 1 < nb; b += 2) {
                const uint8_t* blk0 = base + (size_t)b * sizeof(block_q8_0);
                const uint8_t* blk1 = blk0 + sizeof(block_q8_0);
                _tile_loadd(0, blk0 + 2, stride);
                _tile_loadd(1, xq[b].qs, 4);
                _tile_loadd(3, blk1 + 2, stride);
                _tile_loadd(4, xq[b + 1].qs, 4);
                _tile_zero(2);
                _tile_zero(5);
                _tile_dpbssd(2, 0, 1);
                _tile_dpbssd(5, 3, 4);
                _tile_stored(2, c0, 4);
                _tile_stored(5, c1, 4);
                // 4-byte gathers at each row's block start; the low 16 bits are the fp16 d.
                const __m512i h0 = _mm512_i32gather_epi32(row_off, blk0, 1);
                const __m512i h1 = _mm512_i32gather_epi32(row_off, blk1, 1);
                const __m512 d0 = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h0)),
                                                _mm512_set1_ps(xq[b].d));
                const __m512 d1 = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h1)),
                                                _mm512_set1_ps(xq[b + 1].d));
                acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c0)), d0, acc0);
                acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c1)), d1, acc1);
            }
            if (b < nb) {
                const uint8_t* blk0 = base + (size_t)b * sizeof(block_q8_0);
                _tile_loadd(0, blk0 + 2, stride);
                _tile_loadd(1, xq[b].qs, 4);
                _tile_zero(2);
                _tile_dpbssd(2, 0, 1);
                _tile_stored(2, c0, 4);
                const __m512i h0 = _mm512_i32gather_epi32(row_off, blk0, 1);
                const __m512 d0 = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h0)),
                                                _mm512_set1_ps(xq[b].d));
                acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c0)), d0, acc0);
            }
            _mm512_storeu_ps(y + r, _mm512_add_ps(acc0, acc1));
        }
        _tile_release();
    }
    for (int r = r0 + n_groups * kTileRows; r < r1; ++r) {
        y[r] = q8_0_dot_row_avx512(reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes), xq, nb);
    }
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
void q8_0_gemv_rows_amx(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, float* y,
                        int r0, int r1) {
    q8_0_gemv_rows_scalar(w, row_bytes, xq, nb, y, r0, r1);
}
}  // namespace ktlab

#endif

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
//
// MoE GEMMs (several activation rows per expert: prefill) on weights repacked at load
// (Q8_0x16, BF16x16: quant.h), so a B tile is 16 weight rows of one K block, 1 KiB or less,
// contiguous. The activations of an expert are packed once per call (pack functions below,
// run by the driver before the GEMM tasks) into A tiles of 16 tokens. Output blocks of up to
// 2 x 2 tiles (32 rows x 32 tokens: 4 C tiles, 2 A, 2 B), so each tile load feeds two
// tile ops; C rows are tokens, so results go straight to y[token][row].
//   Q8_0: one tdpbssd per 32-value block (the scales are per block on both sides): the four
//         C tiles go to memory and are scaled, acc[t][n] += C[t][n] * (d_w[n] * d_x[t]), in
//         fp32 (vector code) while the tile unit works on the next block (two C buffers).
//         That scaling (cvt, mul, fma per 16 outputs per block) bounds the kernel: ~400
//         GMAC/s per core with everything in L1 vs ~950 for the tile ops alone (measured).
//   BF16: C accumulates over all of K in the tiles; stored once at the end.
// Weight streams are prefetched by hand (tile loads get little from the hardware prefetcher:
// the T=512 Q8_0 layer went from ~240 to ~150 ms on one busy core). Fewer than kAmxMinRows
// tokens: the AVX-512 kernels on the same repacked layout.
#include "amx_tiles.h"
#include "gemm_rows.h"
#include "isa.h"
#include "quant.h"

#if KTLAB_X86
// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#define KTLAB_AMX \
    __attribute__((target("amx-tile,amx-int8,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define KTLAB_AMX_BF16 \
    __attribute__((target("amx-tile,amx-bf16,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace ktlab {

// From moe_avx512.cpp.
float q8_0_dot_row_avx512(const block_q8_0* wr, const block_q8_act* xq, int nb);
float q8_0_dot_avx512(const uint8_t* w, const uint8_t* x, int k);
void q8_0x16_gemm_avx512(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                         size_t ldy);

namespace {

inline int n_groups(int m) { return (m + kTileRows - 1) / kTileRows; }

// A 16 x 16 fp32 block c[token][row] into y[tok0 + token, row0 + row] for the valid tokens.
inline void store_rows(const float* c, int row0, int tok0, int m, float* y, size_t ldy) {
    const int n_tok = m - tok0 < kTileRows ? m - tok0 : kTileRows;
    for (int t = 0; t < n_tok; ++t) std::memcpy(y + (size_t)(tok0 + t) * ldy + row0, c + kTileRows * t, kTileBytes);
}

// fn(r0, g0, two_rows, two_toks) over the output in blocks of up to 2 x 2 tiles: pairs of
// 16-row groups (n % 16 == 0) by pairs of 16-token groups.
template <class F>
inline void for_block_pairs(int n, int groups, F&& fn) {
    for (int r0 = 0; r0 < n; r0 += 2 * kTileRows) {
        for (int g0 = 0; g0 < groups; g0 += 2) fn(r0, g0, r0 + 2 * kTileRows <= n, g0 + 2 <= groups);
    }
}

// Q8_0 activations packed for A tiles: per group of 16 tokens, per block, 16 x 32 quants
// (token t at 32 t) then the 16 fp32 scales.
constexpr size_t kQ8ActQuantBytes = kTileRows * QK8_0;
constexpr size_t kQ8ActPack = kQ8ActQuantBytes + kTileRows * sizeof(float);

}  // namespace

// ---- Q8_0x16 (repacked weights) x int8 activations on AMX-INT8 tiles ----------------------

size_t q8_0x16_pack_bytes_amx(int m, int k) { return (size_t)n_groups(m) * (size_t)(k / QK8_0) * kQ8ActPack; }

void q8_0x16_pack_amx(const ActRows& x, int m, int k, uint8_t* out) {
    const int nb = k / QK8_0;
    for (int g = 0; g < n_groups(m); ++g) {
        for (int t = 0; t < kTileRows; ++t) {
            const int tok = g * kTileRows + t;
            const block_q8_act* xb = tok < m ? reinterpret_cast<const block_q8_act*>(x.row(tok)) : nullptr;
            for (int b = 0; b < nb; ++b) {
                uint8_t* rec = out + ((size_t)g * nb + b) * kQ8ActPack;
                float* d = reinterpret_cast<float*>(rec + kQ8ActQuantBytes);
                if (xb) {
                    std::memcpy(rec + QK8_0 * t, xb[b].qs, QK8_0);
                    d[t] = xb[b].d;
                } else {
                    std::memset(rec + QK8_0 * t, 0, QK8_0);
                    d[t] = 0.0f;
                }
            }
        }
    }
}

namespace {

// Tiles: C[i][j] = tmm(2i + j) (row group i, token group j), A[j] = tmm(4 + j) (16 tokens x
// 32 quants of one block), B[i] = tmm(6 + i) (one block of row group i: 8 x 64 bytes).
// RG, TG in {1, 2}: 2 x 2 output tiles per step when there are enough rows and tokens.
template <int RG, int TG>
KTLAB_AMX inline void q8_amx_step(const uint8_t* const* wq, const uint8_t* const* aq,
                                   int32_t* c) {
    // Tile loads get little from the hardware prefetcher: the weight streams (the first token
    // group pair reads them from memory) are prefetched by hand, kPrefetchBytes ahead (a
    // block's scales follow its quants).
    for (int i = 0; i < RG; ++i) {
        for (int l = 0; l < kQ8x16BlockBytes; l += 64) _mm_prefetch((const char*)wq[i] + kPrefetchBytes + l, _MM_HINT_T0);
    }
    _tile_loadd(6, wq[0], kTileBytes);
    if constexpr (RG == 2) _tile_loadd(7, wq[1], kTileBytes);
    _tile_loadd(4, aq[0], QK8_0);
    if constexpr (TG == 2) _tile_loadd(5, aq[1], QK8_0);
    _tile_zero(0);
    _tile_dpbssd(0, 4, 6);
    if constexpr (TG == 2) {
        _tile_zero(1);
        _tile_dpbssd(1, 5, 6);
    }
    if constexpr (RG == 2) {
        _tile_zero(2);
        _tile_dpbssd(2, 4, 7);
    }
    if constexpr (RG == 2 && TG == 2) {
        _tile_zero(3);
        _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, c, kTileBytes);
    if constexpr (TG == 2) _tile_stored(1, c + 256, kTileBytes);
    if constexpr (RG == 2) _tile_stored(2, c + 512, kTileBytes);
    if constexpr (RG == 2 && TG == 2) _tile_stored(3, c + 768, kTileBytes);
}

// acc[i][j][t][n] += C[i][j][t][n] * (d_w[i][n] * d_x[j][t]) for one block's exact dots.
template <int RG, int TG>
KTLAB_AMX inline void q8_amx_scale(const int32_t* c, const uint16_t* const* dw, const float* const* dx, float* acc) {
    for (int i = 0; i < RG; ++i) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)dw[i]));
        for (int j = 0; j < TG; ++j) {
            const int32_t* cij = c + (2 * i + j) * 256;
            float* a = acc + (2 * i + j) * 256;
#pragma GCC unroll 16
            for (int t = 0; t < kTileRows; ++t) {
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[j][t]));
                _mm512_store_ps(a + 16 * t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cij + 16 * t)),
                                                             scale, _mm512_load_ps(a + 16 * t)));
            }
        }
    }
}

// Row groups [r0, r0 + 16 RG) x token groups [g0, g0 + TG): every block through the tiles,
// the scaling of block b - 1 overlapping the tile work of block b (two C buffers).
template <int RG, int TG>
KTLAB_AMX void q8_amx_block(const uint8_t* w, size_t row_bytes, int nb, const uint8_t* packed, int r0, int g0, int m,
                            float* y, size_t ldy) {
    alignas(64) float acc[4 * 256] = {};
    alignas(64) int32_t c[2][4 * 256];
    const uint8_t* wq[2];
    const uint16_t* dw[2];
    const uint8_t* aq[2];
    const float* dx[2];
    auto point = [&](int b) {
        for (int i = 0; i < RG; ++i) {
            const uint8_t* group = w + (size_t)(r0 + kTileRows * i) * row_bytes;
            wq[i] = q8x16_block(group, b);
            dw[i] = q8x16_scales(wq[i]);
        }
        for (int j = 0; j < TG; ++j) {
            aq[j] = packed + ((size_t)(g0 + j) * nb + b) * kQ8ActPack;
            dx[j] = reinterpret_cast<const float*>(aq[j] + kQ8ActQuantBytes);
        }
    };
    for (int b = 0; b < nb; ++b) {
        point(b);
        q8_amx_step<RG, TG>(wq, aq, c[b & 1]);
        if (b > 0) {
            point(b - 1);
            q8_amx_scale<RG, TG>(c[(b - 1) & 1], dw, dx, acc);
        }
    }
    point(nb - 1);
    q8_amx_scale<RG, TG>(c[(nb - 1) & 1], dw, dx, acc);
    for (int i = 0; i < RG; ++i) {
        for (int j = 0; j < TG; ++j) store_rows(acc + (2 * i + j) * 256, r0 + kTileRows * i, (g0 + j) * kTileRows, m, y, ldy);
    }
}

}  // namespace

KTLAB_AMX void q8_0x16_gemm_amx(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                                size_t ldy) {
    if (!x.packed) {  // too few tokens for tiles: the VNNI kernel on the same layout
        q8_0x16_gemm_avx512(w, row_bytes, n, k, x, m, y, ldy);
        return;
    }
    const int nb = k / QK8_0;
    TileConfig cfg;
    set_tiles(&cfg, {TileShape{0, kTileRows, kTileBytes}, TileShape{1, kTileRows, kTileBytes},
                     TileShape{2, kTileRows, kTileBytes}, TileShape{3, kTileRows, kTileBytes},
                     TileShape{4, kTileRows, QK8_0}, TileShape{5, kTileRows, QK8_0}, TileShape{6, 8, kTileBytes},
                     TileShape{7, 8, kTileBytes}});
    load_tile_config(cfg);
    for_block_pairs(n, n_groups(m), [&](int r0, int g0, bool two_rows, bool two_toks) {
        if (two_rows && two_toks) q8_amx_block<2, 2>(w, row_bytes, nb, x.packed, r0, g0, m, y, ldy);
        else if (two_rows) q8_amx_block<2, 1>(w, row_bytes, nb, x.packed, r0, g0, m, y, ldy);
        else if (two_toks) q8_amx_block<1, 2>(w, row_bytes, nb, x.packed, r0, g0, m, y, ldy);
        else q8_amx_block<1, 1>(w, row_bytes, nb, x.packed, r0, g0, m, y, ldy);
    });
    _tile_release();
}

// ---- BF16x16 (repacked weights) x bf16 activations on AMX-BF16 tiles --------------------
// Activations packed per group of 16 tokens as plain [16][k] bf16 rows (zero padded): an A
// tile is 16 tokens x 32 values at column 32 c, stride 2 k. C accumulates all of K in the tile.

size_t bf16x16_pack_bytes_amx(int m, int k) { return (size_t)n_groups(m) * kTileRows * (size_t)k * 2; }

void bf16x16_pack_amx(const ActRows& x, int m, int k, uint8_t* out) {
    const size_t row = (size_t)k * 2;
    for (int t = 0; t < n_groups(m) * kTileRows; ++t) {
        if (t < m) std::memcpy(out + row * t, x.row(t), row);
        else std::memset(out + row * t, 0, row);
    }
}

namespace {

// Same tile roles as the Q8_0 kernel (C[i][j] = tmm(2i + j), A[j] = tmm(4 + j), B[i] = tmm(6 + i)).
template <int RG, int TG>
KTLAB_AMX_BF16 void bf16_amx_block(const uint8_t* w, size_t row_bytes, int k, const uint8_t* packed, int r0, int g0,
                                   int m, float* y, size_t ldy) {
    const uint8_t* wg[2];
    const uint8_t* ag[2];
    for (int i = 0; i < RG; ++i) wg[i] = w + (size_t)(r0 + kTileRows * i) * row_bytes;
    for (int j = 0; j < TG; ++j) ag[j] = packed + (size_t)(g0 + j) * kTileRows * k * 2;
    const long a_stride = (long)k * 2;
    _tile_zero(0);
    if constexpr (TG == 2) _tile_zero(1);
    if constexpr (RG == 2) _tile_zero(2);
    if constexpr (RG == 2 && TG == 2) _tile_zero(3);
    for (int c = 0; c < k / kBf16x16Chunk; ++c) {
        for (int i = 0; i < RG; ++i) {
            const char* next = (const char*)wg[i] + (size_t)c * kBf16x16ChunkBytes + kPrefetchBytes;
            for (int l = 0; l < kBf16x16ChunkBytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
        }
        _tile_loadd(6, wg[0] + (size_t)c * kBf16x16ChunkBytes, kTileBytes);
        if constexpr (RG == 2) _tile_loadd(7, wg[1] + (size_t)c * kBf16x16ChunkBytes, kTileBytes);
        _tile_loadd(4, ag[0] + (size_t)c * kTileBytes, a_stride);
        if constexpr (TG == 2) _tile_loadd(5, ag[1] + (size_t)c * kTileBytes, a_stride);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (TG == 2) _tile_dpbf16ps(1, 5, 6);
        if constexpr (RG == 2) _tile_dpbf16ps(2, 4, 7);
        if constexpr (RG == 2 && TG == 2) _tile_dpbf16ps(3, 5, 7);
    }
    alignas(64) float c[4][kTileRows * kTileRows];
    _tile_stored(0, c[0], kTileBytes);
    if constexpr (TG == 2) _tile_stored(1, c[1], kTileBytes);
    if constexpr (RG == 2) _tile_stored(2, c[2], kTileBytes);
    if constexpr (RG == 2 && TG == 2) _tile_stored(3, c[3], kTileBytes);
    for (int i = 0; i < RG; ++i) {
        for (int j = 0; j < TG; ++j) store_rows(c[2 * i + j], r0 + kTileRows * i, (g0 + j) * kTileRows, m, y, ldy);
    }
}

}  // namespace

KTLAB_AMX_BF16 void bf16x16_gemm_amx(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                                     float* y, size_t ldy) {
    if (!x.packed) {  // too few tokens for tiles: vdpbf16ps on the same layout
        bf16x16_gemm_avx512bf16(w, row_bytes, n, k, x, m, y, ldy);
        return;
    }
    TileConfig cfg;
    set_tiles(&cfg, {TileShape{0, kTileRows, kTileBytes}, TileShape{1, kTileRows, kTileBytes},
                     TileShape{2, kTileRows, kTileBytes}, TileShape{3, kTileRows, kTileBytes},
                     TileShape{4, kTileRows, kTileBytes}, TileShape{5, kTileRows, kTileBytes},
                     TileShape{6, kTileRows, kTileBytes}, TileShape{7, kTileRows, kTileBytes}});
    load_tile_config(cfg);
    for_block_pairs(n, n_groups(m), [&](int r0, int g0, bool two_rows, bool two_toks) {
        if (two_rows && two_toks) bf16_amx_block<2, 2>(w, row_bytes, k, x.packed, r0, g0, m, y, ldy);
        else if (two_rows) bf16_amx_block<2, 1>(w, row_bytes, k, x.packed, r0, g0, m, y, ldy);
        else if (two_toks) bf16_amx_block<1, 2>(w, row_bytes, k, x.packed, r0, g0, m, y, ldy);
        else bf16_amx_block<1, 1>(w, row_bytes, k, x.packed, r0, g0, m, y, ldy);
    });
    _tile_release();
}

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
        load_tile_config(cfg);

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

// Several tokens: the one-column tile GEMV per token (so a token's result is the GEMV's).
KTLAB_AMX void q8_0_gemm_rows_amx(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m,
                                  float* y, size_t ldy, int r0, int r1) {
    for (int j = 0; j < m; ++j) q8_0_gemv_rows_amx(w, row_bytes, xq + (size_t)j * nb, nb, y + (size_t)j * ldy, r0, r1);
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
void q8_0_gemv_rows_amx(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, float* y,
                        int r0, int r1) {
    q8_0_gemv_rows_scalar(w, row_bytes, xq, nb, y, r0, r1);
}
void q8_0_gemm_rows_amx(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m, float* y,
                        size_t ldy, int r0, int r1) {
    q8_0_gemm_rows_scalar(w, row_bytes, xq, nb, m, y, ldy, r0, r1);
}
KTLAB_GEMM_DECL(q8_0x16_gemm_amx) { q8_0x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16x16_gemm_amx) { bf16x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0x16_pack_amx(const ActRows&, int, int, uint8_t*) {}
size_t q8_0x16_pack_bytes_amx(int, int) { return 0; }
void bf16x16_pack_amx(const ActRows&, int, int, uint8_t*) {}
size_t bf16x16_pack_bytes_amx(int, int) { return 0; }
}  // namespace ktlab

#endif

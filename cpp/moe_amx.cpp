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
// MoE GEMMs (several activation rows per expert: prefill). The activations of an expert are
// packed once per call (pack functions below, run by the driver before the GEMM tasks) into
// the VNNI layout tiles want as B, 16 activation rows (tokens) per group, zero padded:
//   Q8_0: per group, per block b: 8 x 64 bytes (B[kk][4j + p] = x_j.qs[b][4kk + p]), then
//         the 16 fp32 scales d_j[b]. A = 16 raw weight rows x 32 quants (no weight repack),
//         C = 16 rows x 16 tokens int32 = one block's exact dots, scaled by d_w[row] * d_x[j]
//         (an outer product) into 16 zmm accumulators.
//   BF16: per group, per 32 values of K: 16 x 64 bytes (B[kk][2j + p] = x_j[2kk + p]).
//         A = 16 raw weight rows x 32 bf16, C = fp32 accumulated over all of K in the tile.
// Weight rows past the last full group of 16 go through the AVX-512 row kernels. Per row
// group the token groups run one after another, re-reading that group's weights from cache.
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
float bf16_dot_avx512(const uint8_t* w, const uint8_t* x, int k);
float bf16_dot_avx512bf16(const uint8_t* w, const uint8_t* x, int k);

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
constexpr int kTileBytes = 64;  // bytes per tile row (colsb) at most

// One tile shape per register: rows x colsb.
struct TileShape {
    int reg, rows, colsb;
};

template <int N>
void set_tiles(TileConfig* cfg, const TileShape (&shapes)[N]) {
    *cfg = TileConfig{};
    cfg->palette_id = 1;
    for (const TileShape& t : shapes) {
        cfg->rows[t.reg] = (uint8_t)t.rows;
        cfg->colsb[t.reg] = (uint16_t)t.colsb;
    }
}

inline int n_groups(int m) { return (m + kTileRows - 1) / kTileRows; }

// y[j, i] for the rows in [n_full, n): the path's row kernel on the unpacked activation rows.
inline void tail_rows(row_dot_fn dot, const uint8_t* w, size_t row_bytes, int n_full, int n, int k,
                      const ActRows& x, int m, float* y, size_t ldy) {
    for (int i = n_full; i < n; ++i) {
        for (int j = 0; j < m; ++j) y[(size_t)j * ldy + i] = dot(w + (size_t)i * row_bytes, x.row(j), k);
    }
}

// Write a 16 x 16 fp32 block (rows = weight rows, columns = tokens) of C into y[token, row]
// for the valid tokens only.
inline void store_block(const float* c, int row0, int tok0, int m, float* y, size_t ldy) {
    const int n_tok = m - tok0 < kTileRows ? m - tok0 : kTileRows;
    for (int t = 0; t < n_tok; ++t) {
        float* yt = y + (size_t)(tok0 + t) * ldy + row0;
        for (int r = 0; r < kTileRows; ++r) yt[r] = c[r * kTileRows + t];
    }
}

// Q8_0 packed group: per block, 512 bytes of B then 16 fp32 scales.
constexpr size_t kQ8BlockPack = 8 * 64 + 16 * sizeof(float);

}  // namespace

// ---- Q8_0 x int8 activations on AMX-INT8 tiles ----------------------------------------------

size_t q8_0_pack_bytes_amx(int m, int k) { return (size_t)n_groups(m) * (size_t)(k / QK8_0) * kQ8BlockPack; }

void q8_0_pack_amx(const ActRows& x, int m, int k, uint8_t* out) {
    const int nb = k / QK8_0;
    for (int g = 0; g < n_groups(m); ++g) {
        uint8_t* group = out + (size_t)g * nb * kQ8BlockPack;
        for (int b = 0; b < nb; ++b) {
            uint8_t* qs = group + (size_t)b * kQ8BlockPack;
            float* d = reinterpret_cast<float*>(qs + 8 * 64);
            for (int j = 0; j < kTileRows; ++j) {
                const int tok = g * kTileRows + j;
                if (tok >= m) {
                    for (int kk = 0; kk < 8; ++kk) std::memset(qs + kk * 64 + 4 * j, 0, 4);
                    d[j] = 0.0f;
                    continue;
                }
                const block_q8_act& blk = reinterpret_cast<const block_q8_act*>(x.row(tok))[b];
                for (int kk = 0; kk < 8; ++kk) std::memcpy(qs + kk * 64 + 4 * j, blk.qs + 4 * kk, 4);
                d[j] = blk.d;
            }
        }
    }
}

KTLAB_AMX void q8_0_gemm_amx(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                             size_t ldy) {
    const int nb = k / QK8_0;
    const int n_full = x.packed ? n / kTileRows * kTileRows : 0;
    if (n_full > 0) {
        TileConfig cfg;
        set_tiles(&cfg, {TileShape{0, kTileRows, QK8_0}, TileShape{1, 8, kTileBytes}, TileShape{2, kTileRows, kTileBytes}});
        _tile_loadconfig(&cfg);
        alignas(64) int32_t c[kTileRows * kTileRows];
        alignas(64) float out[kTileRows * kTileRows];
        for (int r0 = 0; r0 < n_full; r0 += kTileRows) {
            const uint8_t* rows = w + (size_t)r0 * row_bytes;
            for (int g = 0; g < n_groups(m); ++g) {
                const uint8_t* group = x.packed + (size_t)g * nb * kQ8BlockPack;
                __m512 acc[kTileRows];
                for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_ps();
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* blk = rows + (size_t)b * sizeof(block_q8_0);
                    const uint8_t* packed = group + (size_t)b * kQ8BlockPack;
                    _tile_loadd(0, blk + 2, (long)row_bytes);
                    _tile_loadd(1, packed, kTileBytes);
                    _tile_zero(2);
                    _tile_dpbssd(2, 0, 1);
                    _tile_stored(2, c, kTileBytes);
                    const __m512 dx = _mm512_loadu_ps(reinterpret_cast<const float*>(packed + 8 * 64));
#pragma GCC unroll 16
                    for (int r = 0; r < kTileRows; ++r) {
                        uint16_t dw;
                        std::memcpy(&dw, blk + (size_t)r * row_bytes, sizeof dw);
                        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(dw)), dx);
                        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + r * kTileRows)), scale,
                                                 acc[r]);
                    }
                }
                for (int r = 0; r < kTileRows; ++r) _mm512_store_ps(out + r * kTileRows, acc[r]);
                store_block(out, r0, g * kTileRows, m, y, ldy);
            }
        }
        _tile_release();
    }
    tail_rows(q8_0_dot_avx512, w, row_bytes, n_full, n, k, x, m, y, ldy);
}

// ---- BF16 x bf16 activations on AMX-BF16 tiles ------------------------------------------------

size_t bf16_pack_bytes_amx(int m, int k) {
    return k % 32 == 0 ? (size_t)n_groups(m) * (size_t)(k / 32) * 1024 : 0;  // 0: no tiles
}

void bf16_pack_amx(const ActRows& x, int m, int k, uint8_t* out) {
    const int nc = k / 32;
    for (int g = 0; g < n_groups(m); ++g) {
        uint16_t* group = reinterpret_cast<uint16_t*>(out + (size_t)g * nc * 1024);
        for (int j = 0; j < kTileRows; ++j) {
            const int tok = g * kTileRows + j;
            const uint16_t* xr = tok < m ? reinterpret_cast<const uint16_t*>(x.row(tok)) : nullptr;
            for (int c = 0; c < nc; ++c) {
                uint16_t* tile = group + (size_t)c * 512;
                for (int kk = 0; kk < 16; ++kk) {
                    tile[kk * 32 + 2 * j] = xr ? xr[32 * c + 2 * kk] : 0;
                    tile[kk * 32 + 2 * j + 1] = xr ? xr[32 * c + 2 * kk + 1] : 0;
                }
            }
        }
    }
}

KTLAB_AMX_BF16 void bf16_gemm_amx(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                                  float* y, size_t ldy) {
    const int nc = k / 32;
    const int n_full = x.packed && k % 32 == 0 ? n / kTileRows * kTileRows : 0;
    if (n_full > 0) {
        TileConfig cfg;
        set_tiles(&cfg, {TileShape{0, kTileRows, kTileBytes}, TileShape{1, 16, kTileBytes},
                         TileShape{2, kTileRows, kTileBytes}});
        _tile_loadconfig(&cfg);
        alignas(64) float out[kTileRows * kTileRows];
        for (int r0 = 0; r0 < n_full; r0 += kTileRows) {
            const uint8_t* rows = w + (size_t)r0 * row_bytes;
            for (int g = 0; g < n_groups(m); ++g) {
                const uint8_t* group = x.packed + (size_t)g * nc * 1024;
                _tile_zero(2);
                for (int c = 0; c < nc; ++c) {
                    _tile_loadd(0, rows + (size_t)c * 64, (long)row_bytes);
                    _tile_loadd(1, group + (size_t)c * 1024, kTileBytes);
                    _tile_dpbf16ps(2, 0, 1);
                }
                _tile_stored(2, out, kTileBytes);
                store_block(out, r0, g * kTileRows, m, y, ldy);
            }
        }
        _tile_release();
    }
    // AMX-BF16 CPUs so far all have avx512_bf16, but the spec does not promise it.
    static const row_dot_fn bf16_dot = cpu_features().avx512bf16 ? bf16_dot_avx512bf16 : bf16_dot_avx512;
    tail_rows(bf16_dot, w, row_bytes, n_full, n, k, x, m, y, ldy);
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
KTLAB_GEMM_DECL(q8_0_gemm_amx) { q8_0_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(bf16_gemm_amx) { bf16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
void q8_0_pack_amx(const ActRows&, int, int, uint8_t*) {}
size_t q8_0_pack_bytes_amx(int, int) { return 0; }
void bf16_pack_amx(const ActRows&, int, int, uint8_t*) {}
size_t bf16_pack_bytes_amx(int, int) { return 0; }
}  // namespace ktlab

#endif

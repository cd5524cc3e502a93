// MXFP4x16 on AVX-512 VNNI (see mxfp4.h). Twin: mxfp4x16_gemm_scalar.
// Per group of 16 rows and block: four 64-byte chunks of nibbles, each split into its low and high
// nibbles and mapped through the table (values + 12, u8) with vpshufb, so a chunk gives two zmm of
// 16 rows x 4 weights; vpdpbusd against a token's 4 activation quants broadcast sums them per row.
#include "isa.h"
#include "mxfp4.h"

#if KTLAB_X86
#include <immintrin.h>

#define KTLAB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace ktlab {

namespace {

constexpr int kTokenTile = 8;

template <int TT>
struct Mxfp4x16Tile {
    KTLAB_AVX512 static void run(const uint8_t* group, int nb, const block_q8_act* const* x, const int32_t* sums,
                                 float* y, size_t ldy) {
        const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
        const __m512i low = _mm512_set1_epi8(0x0F);
        __m512 acc[TT];
        for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* block = group + (size_t)b * kMxfp4x16BlockBytes;
            for (int l = 0; l < kMxfp4x16BlockBytes; l += 64) _mm_prefetch((const char*)block + kPrefetchBytes + l, _MM_HINT_T0);
            __m512i dot[TT];
            for (int t = 0; t < TT; ++t) dot[t] = _mm512_setzero_si512();
            for (int kk = 0; kk < 4; ++kk) {
                const __m512i v = _mm512_loadu_si512(block + 64 * kk);
                const __m512i wlo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low));
                const __m512i whi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
                for (int t = 0; t < TT; ++t) {
                    int32_t lo4, hi4;
                    std::memcpy(&lo4, x[t][b].qs + 4 * kk, 4);
                    std::memcpy(&hi4, x[t][b].qs + 16 + 4 * kk, 4);
                    dot[t] = _mm512_dpbusd_epi32(dot[t], wlo, _mm512_set1_epi32(lo4));
                    dot[t] = _mm512_dpbusd_epi32(dot[t], whi, _mm512_set1_epi32(hi4));
                }
            }
            const __m512 scale = _mm512_loadu_ps(block + kMxfp4x16QuantBytes);
            for (int t = 0; t < TT; ++t) {
                const __m512i isum = _mm512_sub_epi32(dot[t], _mm512_set1_epi32(sums[(size_t)t * nb + b]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, _mm512_set1_ps(x[t][b].d)),
                                         acc[t]);
            }
        }
        for (int t = 0; t < TT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
    }
};

}  // namespace

KTLAB_GEMM_DECL(mxfp4x16_gemm_avx512) { mxfp4x16_gemm<Mxfp4x16Tile, kTokenTile>(w, row_bytes, n, k, x, m, y, ldy); }

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
KTLAB_GEMM_DECL(mxfp4x16_gemm_avx512) { mxfp4x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

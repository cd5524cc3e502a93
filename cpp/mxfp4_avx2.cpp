// MXFP4x16 on AVX2 (see mxfp4.h). Twin: mxfp4x16_gemm_scalar.
// A 64-byte chunk of a group's block is two ymm of 8 rows x 4 nibble pairs; the low and high
// nibbles go through the table (values + 12, u8) with vpshufb, and maddubs + madd against a
// token's 4 activation quants broadcast give those 8 rows' partial dots in the int32 lanes
// ((value + 12) * q pairs stay within int16: 2 * 24 * 127).
#include "isa.h"
#include "mxfp4.h"

#if KTLAB_X86
#include <immintrin.h>

#define KTLAB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ktlab {

namespace {

constexpr int kTokenTile = 4;

template <int TT>
struct Mxfp4x16Tile {
    KTLAB_AVX2 static void run(const uint8_t* group, int nb, const block_q8_act* const* x, const int32_t* sums,
                               float* y, size_t ldy) {
        const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                             12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
        const __m256i low = _mm256_set1_epi8(0x0F);
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 acc[TT][2];
        for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* block = group + (size_t)b * kMxfp4x16BlockBytes;
            for (int l = 0; l < kMxfp4x16BlockBytes; l += 64) _mm_prefetch((const char*)block + kPrefetchBytes + l, _MM_HINT_T0);
            __m256i dot[TT][2];
            for (int t = 0; t < TT; ++t) dot[t][0] = dot[t][1] = _mm256_setzero_si256();
            for (int kk = 0; kk < 4; ++kk) {
                for (int h = 0; h < 2; ++h) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(block + 64 * kk + 32 * h));
                    const __m256i wlo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
                    const __m256i whi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                    for (int t = 0; t < TT; ++t) {
                        int32_t lo4, hi4;
                        std::memcpy(&lo4, x[t][b].qs + 4 * kk, 4);
                        std::memcpy(&hi4, x[t][b].qs + 16 + 4 * kk, 4);
                        const __m256i plo = _mm256_maddubs_epi16(wlo, _mm256_set1_epi32(lo4));
                        const __m256i phi = _mm256_maddubs_epi16(whi, _mm256_set1_epi32(hi4));
                        dot[t][h] = _mm256_add_epi32(dot[t][h], _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones));
                    }
                }
            }
            for (int h = 0; h < 2; ++h) {
                const __m256 scale = _mm256_loadu_ps((const float*)(block + kMxfp4x16QuantBytes) + 8 * h);
                for (int t = 0; t < TT; ++t) {
                    const __m256i isum = _mm256_sub_epi32(dot[t][h], _mm256_set1_epi32(sums[(size_t)t * nb + b]));
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, _mm256_set1_ps(x[t][b].d)),
                                                acc[t][h]);
                }
            }
        }
        for (int t = 0; t < TT; ++t) {
            for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + (size_t)t * ldy + 8 * h, acc[t][h]);
        }
    }
};

}  // namespace

KTLAB_GEMM_DECL(mxfp4x16_gemm_avx2) { mxfp4x16_gemm<Mxfp4x16Tile, kTokenTile>(w, row_bytes, n, k, x, m, y, ldy); }

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
KTLAB_GEMM_DECL(mxfp4x16_gemm_avx2) { mxfp4x16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

// AVX2 kernels of the packed K-quants (kquant.h). Twins in kquant_generic.cpp. Eight rows a ymm:
// a 32-byte load is 8 rows x 4 bytes of quants (8 values each: 4 low and 4 high nibbles);
// maddubs against a token's 4 activation quants broadcast gives the rows' pair sums, madd with
// the rows' sub-block scales (int16, each in both halves of its row's lane) their scaled int32
// sums. Unsigned quants times signed activations: no sign trick. Everything integer is exact
// (|pair| <= 2 * 63 * 127), so the sums are the scalar twin's, and the floats follow its order.
#include <cstring>

#include "isa.h"
#include "kquant.h"
#include "quant.h"

#if KTLAB_X86
#include <immintrin.h>

#define KTLAB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ktlab {

namespace {

constexpr int kAvx2Tokens = 2;  // tokens per pass over a group

// Each int32 lane's low 16 bits copied into its high 16 bits.
KTLAB_AVX2 inline __m256i dup_low16(__m256i v) { return _mm256_or_si256(v, _mm256_slli_epi32(v, 16)); }

// 8 bytes (one per row) -> 8 int32 lanes of (b, b) int16 pairs, the madd multiplier of each row.
KTLAB_AVX2 inline __m256i row_bytes_as_pairs(const uint8_t* p) {
    return dup_low16(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

KTLAB_AVX2 inline __m256i bcast4(const int8_t* q) { return _mm256_set1_epi32(four_quants(q)); }

KTLAB_AVX2 inline __m256i scaled_dot(__m256i w, __m256i x, __m256i scale) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale);
}

KTLAB_AVX2 inline void prefetch_next(const uint8_t* sb, int bytes) {
    for (int l = 0; l < bytes; l += 64) _mm_prefetch((const char*)sb + bytes + l, _MM_HINT_T0);
}

KTLAB_AVX2 inline __m256 fp16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// Q4_Kx16 (Q5 false) and Q5_Kx16 (Q5 true): NT tokens against one 16-row group.
template <bool Q5>
struct Q45Kx16 {
    template <int NT>
    struct Tile {
        KTLAB_AVX2 static void run(const uint8_t* group, int nb, const block_q8_K* const* x, float* y, size_t ldy) {
            constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
            constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
            const __m256i low4 = _mm256_set1_epi8(0x0F), bit = _mm256_set1_epi8(0x10);
            __m256 acc[NT][2];
            for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* sb = group + (size_t)kBytes * b;
                prefetch_next(sb, kBytes);
                for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7
                    __m256i isum[NT], summ[NT];
                    for (int t = 0; t < NT; ++t) isum[t] = summ[t] = _mm256_setzero_si256();
                    for (int j = 0; j < 4; ++j) {
                        const __m256i sc_lo = row_bytes_as_pairs(sb + at.sc + kKx16Rows * 2 * j + 8 * h);
                        const __m256i sc_hi = row_bytes_as_pairs(sb + at.sc + kKx16Rows * (2 * j + 1) + 8 * h);
                        for (int c = 0; c < 8; ++c) {
                            const __m256i wv = _mm256_loadu_si256((const __m256i*)(sb + 64 * (8 * j + c) + 32 * h));
                            __m256i lo = _mm256_and_si256(wv, low4);
                            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
                            if (Q5) {  // the fifth bits: bit 2j (low) and 2j + 1 (high) moved to bit 4
                                const __m256i qh = _mm256_loadu_si256((const __m256i*)(sb + at.qh + 64 * c + 32 * h));
                                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j), 4), bit));
                                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j + 1), 4), bit));
                            }
                            for (int t = 0; t < NT; ++t) {
                                const int8_t* q = x[t][b].qs + 64 * j + 4 * c;
                                isum[t] = _mm256_add_epi32(isum[t], scaled_dot(lo, bcast4(q), sc_lo));
                                isum[t] = _mm256_add_epi32(isum[t], scaled_dot(hi, bcast4(q + 32), sc_hi));
                            }
                        }
                    }
                    for (int s = 0; s < 8; ++s) {  // mins: m[s] * (bsums[2s] + bsums[2s + 1])
                        const __m256i mn = row_bytes_as_pairs(sb + at.mn + kKx16Rows * s + 8 * h);
                        for (int t = 0; t < NT; ++t) {
                            const __m256i bs = _mm256_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * s)));
                            summ[t] = _mm256_add_epi32(summ[t], _mm256_madd_epi16(mn, bs));
                        }
                    }
                    const __m256 d = fp16x8(sb + at.d + 16 * h), dmin = fp16x8(sb + at.dmin + 16 * h);
                    for (int t = 0; t < NT; ++t) {
                        const __m256 v = _mm256_sub_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[t])),
                                                       _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(summ[t])));
                        acc[t][h] = _mm256_add_ps(acc[t][h], _mm256_mul_ps(_mm256_set1_ps(x[t][b].d), v));
                    }
                }
            }
            for (int t = 0; t < NT; ++t) {
                _mm256_storeu_ps(y + (size_t)t * ldy, acc[t][0]);
                _mm256_storeu_ps(y + (size_t)t * ldy + 8, acc[t][1]);
            }
        }
    };
};

// Q6_Kx16: per half-group g (8 rows), the u6 = nibble | 2 high bits << 4 of four quarters per
// chunk, against the activations; then the -32 offset from the scale pairs and bsums.
template <int NT>
struct Q6Kx16Tile {
    KTLAB_AVX2 static void run(const uint8_t* group, int nb, const block_q8_K* const* x, float* y, size_t ldy) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
        const __m256i dup_even = _mm256_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5,
                                                  4, 5, 8, 9, 8, 9, 12, 13, 12, 13);
        const __m256i dup_odd = _mm256_add_epi8(dup_even, _mm256_set1_epi8(2));
        __m256 acc[NT][2];
        for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            prefetch_next(sb, kBytes);
            for (int g = 0; g < 2; ++g) {
                __m256i isum[NT], offset[NT];
                for (int t = 0; t < NT; ++t) isum[t] = offset[t] = _mm256_setzero_si256();
                for (int h = 0; h < 2; ++h) {
                    __m256i pair[4];  // scale pairs 4h + Q: (scales[8h + 2Q], scales[8h + 2Q + 1]) per row
                    for (int Q = 0; Q < 4; ++Q) {
                        pair[Q] = _mm256_cvtepi8_epi16(
                            _mm_loadu_si128((const __m128i*)(sb + kQ6Kx16Scales + 32 * (4 * h + Q) + 16 * g)));
                    }
                    for (int c = 0; c < 8; ++c) {
                        const uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c + 32 * g;
                        const __m256i a = _mm256_loadu_si256((const __m256i*)chunk);
                        const __m256i bq = _mm256_loadu_si256((const __m256i*)(chunk + 64));
                        const __m256i qh = _mm256_loadu_si256((const __m256i*)(chunk + 128));
                        __m256i u6[4] = {_mm256_and_si256(a, low4), _mm256_and_si256(bq, low4),
                                         _mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                         _mm256_and_si256(_mm256_srli_epi16(bq, 4), low4)};
                        for (int Q = 0; Q < 4; ++Q) {
                            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * Q), two);
                            u6[Q] = _mm256_or_si256(u6[Q], _mm256_slli_epi16(high, 4));
                        }
                        for (int Q = 0; Q < 4; ++Q) {
                            const __m256i scale = _mm256_shuffle_epi8(pair[Q], c < 4 ? dup_even : dup_odd);
                            for (int t = 0; t < NT; ++t) {
                                const int8_t* q = x[t][b].qs + 128 * h + 32 * Q + 4 * c;
                                isum[t] = _mm256_add_epi32(isum[t], scaled_dot(u6[Q], bcast4(q), scale));
                            }
                        }
                    }
                    for (int Q = 0; Q < 4; ++Q) {  // the offset: scales[s] * bsums[s], pair by pair
                        for (int t = 0; t < NT; ++t) {
                            const __m256i bs =
                                _mm256_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * (4 * h + Q))));
                            offset[t] = _mm256_add_epi32(offset[t], _mm256_madd_epi16(pair[Q], bs));
                        }
                    }
                }
                const __m256 d = fp16x8(sb + kQ6Kx16D + 16 * g);
                for (int t = 0; t < NT; ++t) {
                    const __m256i total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(offset[t], 5));
                    const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x[t][b].d));
                    acc[t][g] = _mm256_add_ps(acc[t][g], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(total)));
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            _mm256_storeu_ps(y + (size_t)t * ldy, acc[t][0]);
            _mm256_storeu_ps(y + (size_t)t * ldy + 8, acc[t][1]);
        }
    }
};

// ---- many tokens: quants unpacked to a byte once per group (kx16_gemm_unpacked) -------------------

constexpr int kUnpackedTokens = 4;
// Paired on 2048 x 2048 matrices, 2 threads (AVX2 forced on an AVX-512 host): Q5_K 1.2-1.3x and
// Q6_K 1.25-1.4x from 4 tokens; Q4_K 0.87x at 16 tokens, 1.06x at 64 (so from 32).
constexpr int kQ4UnpackMinTokens = 32;
constexpr int kQ56UnpackMinTokens = 4;

template <bool Q5>
struct Q45Unpack {
    KTLAB_AVX2 static void run(const uint8_t* group, int nb, uint8_t* out) {
        constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
        constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
        const __m256i low4 = _mm256_set1_epi8(0x0F), bit = _mm256_set1_epi8(0x10);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            uint8_t* u = out + (size_t)kUnpackedBytes * b;
            for (int j = 0; j < 4; ++j) {
                for (int half = 0; half < 16; ++half) {  // 8 chunks x 2 halves of 32 bytes
                    const int c = half / 2, at_byte = 32 * (half % 2);
                    const __m256i wv = _mm256_loadu_si256((const __m256i*)(sb + 64 * (8 * j + c) + at_byte));
                    __m256i lo = _mm256_and_si256(wv, low4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
                    if (Q5) {
                        const __m256i qh = _mm256_loadu_si256((const __m256i*)(sb + at.qh + 64 * c + at_byte));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j), 4), bit));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j + 1), 4), bit));
                    }
                    _mm256_storeu_si256((__m256i*)(u + 64 * (16 * j + c) + at_byte), lo);
                    _mm256_storeu_si256((__m256i*)(u + 64 * (16 * j + 8 + c) + at_byte), hi);
                }
            }
        }
    }
};

struct Q6Unpack {
    KTLAB_AVX2 static void run(const uint8_t* group, int nb, uint8_t* out) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            uint8_t* u = out + (size_t)kUnpackedBytes * b;
            for (int h = 0; h < 2; ++h) {
                for (int half = 0; half < 16; ++half) {
                    const int c = half / 2, at_byte = 32 * (half % 2);
                    const uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c + at_byte;
                    const __m256i a = _mm256_loadu_si256((const __m256i*)chunk);
                    const __m256i bq = _mm256_loadu_si256((const __m256i*)(chunk + 64));
                    const __m256i qh = _mm256_loadu_si256((const __m256i*)(chunk + 128));
                    const __m256i nib[4] = {_mm256_and_si256(a, low4), _mm256_and_si256(bq, low4),
                                            _mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                            _mm256_and_si256(_mm256_srli_epi16(bq, 4), low4)};
                    for (int Q = 0; Q < 4; ++Q) {
                        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * Q), two);
                        _mm256_storeu_si256((__m256i*)(u + 64 * (32 * h + 8 * Q + c) + at_byte),
                                            _mm256_or_si256(nib[Q], _mm256_slli_epi16(high, 4)));
                    }
                }
            }
        }
    }
};

// isum[t] += the scaled dots of NT tokens with Chunks consecutive unpacked chunks (this half's 32
// bytes of each), activation quants from value first_value on.
template <int NT, int Chunks>
KTLAB_AVX2 inline void unpacked_scaled_dots(const uint8_t* u, int first_value, const block_q8_K* const* x, int b,
                                            __m256i scale, __m256i (&isum)[NT]) {
#pragma GCC unroll 8
    for (int c = 0; c < Chunks; ++c) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(u + 64 * c));
        for (int t = 0; t < NT; ++t) {
            isum[t] = _mm256_add_epi32(isum[t], scaled_dot(wv, bcast4(x[t][b].qs + first_value + 4 * c), scale));
        }
    }
}

template <bool Q5>
struct Q45Unpacked {
    template <int NT>
    struct Tile {
        KTLAB_AVX2 static void run(const uint8_t* group, const uint8_t* unpacked, int nb, const block_q8_K* const* x,
                                   float* y, size_t ldy) {
            constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
            constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
            __m256 acc[NT][2];
            for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* sb = group + (size_t)kBytes * b;
                for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7
                    const uint8_t* u = unpacked + (size_t)kUnpackedBytes * b + 32 * h;
                    __m256i isum[NT], summ[NT];
                    for (int t = 0; t < NT; ++t) isum[t] = summ[t] = _mm256_setzero_si256();
                    for (int s = 0; s < 8; ++s) {
                        const __m256i sc = row_bytes_as_pairs(sb + at.sc + kKx16Rows * s + 8 * h);
                        unpacked_scaled_dots<NT, 8>(u + 64 * 8 * s, 32 * s, x, b, sc, isum);
                        const __m256i mn = row_bytes_as_pairs(sb + at.mn + kKx16Rows * s + 8 * h);
                        for (int t = 0; t < NT; ++t) {
                            const __m256i bs = _mm256_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * s)));
                            summ[t] = _mm256_add_epi32(summ[t], _mm256_madd_epi16(mn, bs));
                        }
                    }
                    const __m256 d = fp16x8(sb + at.d + 16 * h), dmin = fp16x8(sb + at.dmin + 16 * h);
                    for (int t = 0; t < NT; ++t) {
                        const __m256 v = _mm256_sub_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[t])),
                                                       _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(summ[t])));
                        acc[t][h] = _mm256_add_ps(acc[t][h], _mm256_mul_ps(_mm256_set1_ps(x[t][b].d), v));
                    }
                }
            }
            for (int t = 0; t < NT; ++t) {
                _mm256_storeu_ps(y + (size_t)t * ldy, acc[t][0]);
                _mm256_storeu_ps(y + (size_t)t * ldy + 8, acc[t][1]);
            }
        }
    };
};

template <int NT>
struct Q6Unpacked {
    KTLAB_AVX2 static void run(const uint8_t* group, const uint8_t* unpacked, int nb, const block_q8_K* const* x,
                               float* y, size_t ldy) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        const __m256i dup_even = _mm256_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5,
                                                  4, 5, 8, 9, 8, 9, 12, 13, 12, 13);
        const __m256i dup_odd = _mm256_add_epi8(dup_even, _mm256_set1_epi8(2));
        __m256 acc[NT][2];
        for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            for (int g = 0; g < 2; ++g) {
                const uint8_t* u = unpacked + (size_t)kUnpackedBytes * b + 32 * g;
                __m256i isum[NT], offset[NT];
                for (int t = 0; t < NT; ++t) isum[t] = offset[t] = _mm256_setzero_si256();
                for (int i = 0; i < 8; ++i) {  // sub-blocks 2i, 2i + 1: 4 chunks each
                    const __m256i pair = _mm256_cvtepi8_epi16(
                        _mm_loadu_si128((const __m128i*)(sb + kQ6Kx16Scales + 32 * i + 16 * g)));
                    unpacked_scaled_dots<NT, 4>(u + 64 * 8 * i, 32 * i, x, b, _mm256_shuffle_epi8(pair, dup_even), isum);
                    unpacked_scaled_dots<NT, 4>(u + 64 * (8 * i + 4), 32 * i + 16, x, b,
                                                _mm256_shuffle_epi8(pair, dup_odd), isum);
                    for (int t = 0; t < NT; ++t) {
                        const __m256i bs = _mm256_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * i)));
                        offset[t] = _mm256_add_epi32(offset[t], _mm256_madd_epi16(pair, bs));
                    }
                }
                const __m256 d = fp16x8(sb + kQ6Kx16D + 16 * g);
                for (int t = 0; t < NT; ++t) {
                    const __m256i total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(offset[t], 5));
                    const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x[t][b].d));
                    acc[t][g] = _mm256_add_ps(acc[t][g], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(total)));
                }
            }
        }
        for (int t = 0; t < NT; ++t) {
            _mm256_storeu_ps(y + (size_t)t * ldy, acc[t][0]);
            _mm256_storeu_ps(y + (size_t)t * ldy + 8, acc[t][1]);
        }
    }
};

template <int NT>
using Q4UTile = Q45Unpacked<false>::Tile<NT>;
template <int NT>
using Q5UTile = Q45Unpacked<true>::Tile<NT>;

template <int NT>
using Q4Tile = Q45Kx16<false>::Tile<NT>;
template <int NT>
using Q5Tile = Q45Kx16<true>::Tile<NT>;

}  // namespace

KTLAB_GEMM_DECL(q4_kx16_gemm_avx2) {
    if (m >= kQ4UnpackMinTokens) {
        kx16_gemm_unpacked<Q45Unpack<false>, Q4UTile, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q4Tile, kAvx2Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}
KTLAB_GEMM_DECL(q5_kx16_gemm_avx2) {
    if (m >= kQ56UnpackMinTokens) {
        kx16_gemm_unpacked<Q45Unpack<true>, Q5UTile, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q5Tile, kAvx2Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}
KTLAB_GEMM_DECL(q6_kx16_gemm_avx2) {
    if (m >= kQ56UnpackMinTokens) {
        kx16_gemm_unpacked<Q6Unpack, Q6Unpacked, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q6Kx16Tile, kAvx2Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
KTLAB_GEMM_DECL(q4_kx16_gemm_avx2) { q4_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q5_kx16_gemm_avx2) { q5_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q6_kx16_gemm_avx2) { q6_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif

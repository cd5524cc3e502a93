// The transposed products' tile kernel on AVX2 + FMA (twin: matmul_t_tile_scalar; see matmul_t.h).
#include "matmul_t.h"
#include "quant.h"

#if KTLAB_X86
#include <immintrin.h>

namespace ktlab {

// Per token, four vectors of columns at a time: four independent fma chains over the tile's rows
// in registers, then one add into dx; the leftover columns on the scalar twin's loop.
__attribute__((target("avx2,fma"))) void matmul_t_tile_avx2(const float* w, int ldw, int rows, const float* dy, int64_t ldy,
                                                  int m, float* dx, int64_t ldx, int len) {
    constexpr int W = 8;
    for (int j = 0; j < m; ++j) {
        const float* d = dy + j * ldy;
        float* o = dx + j * ldx;
        int c = 0;
        for (; c + 4 * W <= len; c += 4 * W) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int r = 0; r < rows; ++r) {
                const __m256 a = _mm256_set1_ps(d[r]);
                const float* wr = w + (size_t)r * ldw + c;
                for (int v = 0; v < 4; ++v) acc[v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(wr + v * W), acc[v]);
            }
            for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + c + v * W, _mm256_add_ps(_mm256_loadu_ps(o + c + v * W), acc[v]));
        }
        for (; c + W <= len; c += W) {
            __m256 acc = _mm256_setzero_ps();
            for (int r = 0; r < rows; ++r) acc = _mm256_fmadd_ps(_mm256_set1_ps(d[r]), _mm256_loadu_ps(w + (size_t)r * ldw + c), acc);
            _mm256_storeu_ps(o + c, _mm256_add_ps(_mm256_loadu_ps(o + c), acc));
        }
        if (c < len) matmul_t_tile_scalar(w + c, ldw, rows, d, ldy, 1, o + c, ldx, len - c);
    }
}

__attribute__((target("avx2,fma,f16c"))) void dequant_q8_0_avx2(const uint8_t* row, int64_t b0, int64_t b1,
                                                                 float* out) {
    const block_q8_0* blocks = reinterpret_cast<const block_q8_0*>(row);
    for (int64_t b = b0; b < b1; ++b, out += QK8_0) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(blocks[b].d));
        for (int i = 0; i < QK8_0; i += 8) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blocks[b].qs + i));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
        }
    }
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the driver links

namespace ktlab {
void matmul_t_tile_avx2(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                        int64_t ldx, int len) {
    matmul_t_tile_scalar(w, ldw, rows, dy, ldy, m, dx, ldx, len);
}
void dequant_q8_0_avx2(const uint8_t* row, int64_t b0, int64_t b1, float* out) {
    dequantize_row_range(WFormat::q8_0, row, b0 * QK8_0, b1 * QK8_0, out);
}
}  // namespace ktlab

#endif

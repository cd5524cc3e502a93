// MXFP4 scalar twins and the MXFP4x16 repack (see mxfp4.h).
#include <cmath>

#include "gemm_rows.h"
#include "isa.h"
#include "mxfp4.h"

namespace ktlab {

namespace {

// One raw MXFP4 row against one activation row.
float mxfp4_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_MXFP4; ++b) {
        const uint8_t* wb = w + (size_t)b * kMxfp4BlockBytes;
        int32_t isum = 0;
        for (int j = 0; j < QK_MXFP4 / 2; ++j) {
            isum += (int32_t)kMxfp4Values[wb[1 + j] & 0x0F] * xb[b].qs[j];
            isum += (int32_t)kMxfp4Values[wb[1 + j] >> 4] * xb[b].qs[QK_MXFP4 / 2 + j];
        }
        sum = std::fma((float)isum, e8m0_half(wb[0]) * xb[b].d, sum);
    }
    return sum;
}

}  // namespace

KTLAB_GEMM_BY_ROWS(mxfp4_gemm_scalar, mxfp4_dot_scalar)

void repack_mxfp4x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    const int64_t nb = k / QK_MXFP4;
    const size_t row_bytes = (size_t)nb * kMxfp4BlockBytes;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        uint8_t* group = out + (size_t)r0 * nb * kMxfp4x16Bytes;
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t* block = group + (size_t)b * kMxfp4x16BlockBytes;
            float scales[16];
            for (int n = 0; n < 16; ++n) {
                const uint8_t* wb = raw + (size_t)(r0 + n) * row_bytes + (size_t)b * kMxfp4BlockBytes;
                scales[n] = e8m0_half(wb[0]);
                for (int kk = 0; kk < 4; ++kk) {
                    for (int p = 0; p < 4; ++p) block[64 * kk + 4 * n + p] = wb[1 + 4 * kk + p];
                }
            }
            std::memcpy(block + kMxfp4x16QuantBytes, scales, sizeof scales);
        }
    }
}

// MXFP4x16: the same sums as mxfp4_dot_scalar, in the same order, per packed row.
KTLAB_GEMM_DECL(mxfp4x16_gemm_scalar) {
    const int nb = k / QK_MXFP4;
    for (int r0 = 0; r0 < n; r0 += 16) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; ++j) {
            const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x.row(j));
            for (int i = 0; i < 16; ++i) {
                float sum = 0.0f;
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* block = group + (size_t)b * kMxfp4x16BlockBytes;
                    int32_t isum = 0;
                    for (int kk = 0; kk < 4; ++kk) {
                        for (int p = 0; p < 4; ++p) {
                            const uint8_t q = block[64 * kk + 4 * i + p];
                            isum += (int32_t)kMxfp4Values[q & 0x0F] * xb[b].qs[4 * kk + p];
                            isum += (int32_t)kMxfp4Values[q >> 4] * xb[b].qs[16 + 4 * kk + p];
                        }
                    }
                    float scale;
                    std::memcpy(&scale, block + kMxfp4x16QuantBytes + 4 * i, 4);
                    sum = std::fma((float)isum, scale * xb[b].d, sum);
                }
                y[(size_t)j * ldy + r0 + i] = sum;
            }
        }
    }
}

}  // namespace ktlab

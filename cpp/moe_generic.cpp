// Scalar twins of every kernel (the reference every SIMD path is tested against), the row
// quantizers, and the ISA-independent drivers that split work over the thread pool.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm_rows.h"
#include "isa.h"
#include "kquant.h"
#include "mxfp4.h"
#include "quant.h"
#include "threadpool.h"

namespace ktlab {

// ---- quantizers -----------------------------------------------------------------------------

void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
    const int64_t nb = k / QK8_0;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j) y[b].qs[j] = (int8_t)std::roundf(xb[j] * id);
    }
}

void quantize_row_q8_act(const float* x, block_q8_act* y, int64_t k) {
    const int64_t nb = k / QK8_0;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int j = 0; j < QK8_0; ++j) y[b].qs[j] = (int8_t)std::roundf(xb[j] * id);
    }
}

void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k) {
    const int64_t nb = k / QK_K;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * QK_K;
        float amax = 0.0f;
        for (int j = 0; j < QK_K; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int j = 0; j < QK_K; ++j) y[b].qs[j] = (int8_t)std::roundf(xb[j] * id);
        for (int g = 0; g < QK_K / 16; ++g) {
            int sum = 0;
            for (int j = 0; j < 16; ++j) sum += y[b].qs[16 * g + j];
            y[b].bsums[g] = (int16_t)sum;
        }
    }
}

void repack_q8_0x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    const int64_t nb = k / QK8_0;
    const size_t row_bytes = (size_t)nb * sizeof(block_q8_0);
    for (int64_t r0 = 0; r0 < rows; r0 += kQ8x16Rows) {
        uint8_t* group = out + (size_t)r0 * row_bytes;
        for (int n = 0; n < kQ8x16Rows; ++n) {
            const block_q8_0* row = reinterpret_cast<const block_q8_0*>(raw + (size_t)(r0 + n) * row_bytes);
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t* block = group + b * kQ8x16BlockBytes;
                std::memcpy(block + kQ8x16QuantBytes + 2 * n, &row[b].d, 2);
                for (int kk = 0; kk < QK8_0 / 4; ++kk) std::memcpy(block + 64 * kk + 4 * n, row[b].qs + 4 * kk, 4);
            }
        }
    }
}

void repack_bf16x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(raw);
    uint16_t* dst = reinterpret_cast<uint16_t*>(out);
    for (int64_t r0 = 0; r0 < rows; r0 += kQ8x16Rows) {
        uint16_t* group = dst + r0 * k;
        for (int n = 0; n < kQ8x16Rows; ++n) {
            const uint16_t* row = src + (r0 + n) * k;
            for (int64_t i = 0; i < k / 2; ++i) {  // pair i = values 2i, 2i + 1: chunk i / 16, kk = i % 16
                const int64_t to = (i / 16 * kQ8x16Rows * 16 + i % 16 * kQ8x16Rows + n) * 2;
                std::memcpy(group + to, row + 2 * i, 4);
            }
        }
    }
}

void convert_row_bf16(const float* x, uint16_t* y, int64_t k) {
    for (int64_t i = 0; i < k; ++i) y[i] = fp32_to_bf16(x[i]);
}

// ---- weight formats and their activations -------------------------------------------------

int format_block_values(WFormat f) {
    switch (f) {
        case WFormat::q8_0:
        case WFormat::mxfp4: return QK8_0;
        case WFormat::q4_k:
        case WFormat::q5_k:
        case WFormat::q6_k: return QK_K;
        case WFormat::bf16: return 1;
    }
    return 1;
}

int format_block_bytes(WFormat f) {
    switch (f) {
        case WFormat::q8_0: return (int)sizeof(block_q8_0);
        case WFormat::q4_k: return (int)sizeof(block_q4_K);
        case WFormat::q5_k: return (int)sizeof(block_q5_K);
        case WFormat::q6_k: return (int)sizeof(block_q6_K);
        case WFormat::bf16: return 2;
        case WFormat::mxfp4: return kMxfp4BlockBytes;
    }
    return 1;
}

int act_block_values(WFormat f) { return format_block_values(f); }

int format_packed_block_bytes(WFormat f) {
    switch (f) {
        case WFormat::q4_k: return kQ4Kx16Bytes;
        case WFormat::q5_k: return kQ5Kx16Bytes;
        case WFormat::mxfp4: return kMxfp4x16Bytes;
        default: return format_block_bytes(f);
    }
}

int act_block_bytes(WFormat f) {
    switch (f) {
        case WFormat::q8_0:
        case WFormat::mxfp4: return (int)sizeof(block_q8_act);
        case WFormat::q4_k:
        case WFormat::q5_k:
        case WFormat::q6_k: return (int)sizeof(block_q8_K);
        case WFormat::bf16: return 2;
    }
    return 1;
}

void quantize_act_row(WFormat f, const float* x, uint8_t* y, int64_t k, const KernelTable& kt) {
    switch (f) {
        case WFormat::q8_0:
        case WFormat::mxfp4: kt.quantize_q8_act(x, reinterpret_cast<block_q8_act*>(y), k); return;
        case WFormat::q4_k:
        case WFormat::q5_k:
        case WFormat::q6_k: kt.quantize_q8_K(x, reinterpret_cast<block_q8_K*>(y), k); return;
        case WFormat::bf16: convert_row_bf16(x, reinterpret_cast<uint16_t*>(y), k); return;
    }
}

// ---- scalar dot products: the reference of every SIMD kernel ---------------------------------

namespace {

float q8_0_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const block_q8_0* wb = reinterpret_cast<const block_q8_0*>(w);
    const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x);
    float sum = 0.0f;
    for (int b = 0; b < k / QK8_0; ++b) {
        int32_t isum = 0;
        for (int j = 0; j < QK8_0; ++j) isum += (int32_t)wb[b].qs[j] * (int32_t)xb[b].qs[j];
        sum += (fp16_to_fp32(wb[b].d) * xb[b].d) * (float)isum;
    }
    return sum;
}

// Per super-block: d_x * (d * sum_s sc[s] * dot(q4_s, q8_s) - dmin * sum_s min[s] * bsum_s),
// the integer sums exact. Quants: 32-byte chunk j holds values 64j..64j+31 in its low
// nibbles and 64j+32..64j+63 in its high nibbles.
float q4_k_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w);
    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_K; ++b) {
        uint8_t sc[8];
        const int32_t summ = q4_k_mins_dot(wb[b].scales, xb[b], sc);
        int32_t isum = 0;
        for (int j = 0; j < 4; ++j) {
            const uint8_t* q4 = wb[b].qs + 32 * j;
            const int8_t* q8 = xb[b].qs + 64 * j;
            int32_t lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                lo += (int32_t)(q4[l] & 0xF) * q8[l];
                hi += (int32_t)(q4[l] >> 4) * q8[l + 32];
            }
            isum += (int32_t)sc[2 * j] * lo + (int32_t)sc[2 * j + 1] * hi;
        }
        sum += xb[b].d * (fp16_to_fp32(wb[b].d) * (float)isum - fp16_to_fp32(wb[b].dmin) * (float)summ);
    }
    return sum;
}

// Q5_K: Q4_K's sums with the fifth bit of each quant from qh.
float q5_k_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const block_q5_K* wb = reinterpret_cast<const block_q5_K*>(w);
    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_K; ++b) {
        uint8_t sc[8];
        const int32_t summ = q4_k_mins_dot(wb[b].scales, xb[b], sc);
        int32_t isum = 0;
        for (int j = 0; j < 4; ++j) {
            const uint8_t* q4 = wb[b].qs + 32 * j;
            const int8_t* q8 = xb[b].qs + 64 * j;
            int32_t lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                const int h = wb[b].qh[l] >> (2 * j);
                lo += (int32_t)((q4[l] & 0xF) | ((h & 1) << 4)) * q8[l];
                hi += (int32_t)((q4[l] >> 4) | ((h & 2) << 3)) * q8[l + 32];
            }
            isum += (int32_t)sc[2 * j] * lo + (int32_t)sc[2 * j + 1] * hi;
        }
        sum += xb[b].d * (fp16_to_fp32(wb[b].d) * (float)isum - fp16_to_fp32(wb[b].dmin) * (float)summ);
    }
    return sum;
}

// Q6_K value l of a 128-half (ggml's dequantize_row_q6_K), as the unsigned u6 = q + 32.
inline int q6_k_u6(const uint8_t* ql, const uint8_t* qh, int l) {
    const int quarter = l / 32, i = l % 32;
    const int low = quarter & 1 ? ql[i + 32] : ql[i];
    const int nib = quarter < 2 ? (low & 0xF) : (low >> 4);
    return nib | (((qh[i] >> (2 * quarter)) & 3) << 4);
}

// Per super-block: d * d_x * (sum_s sc[s] * dot(u6_s, q8_s) - 32 * sum_s sc[s] * bsum_s).
float q6_k_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w);
    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x);
    float sum = 0.0f;
    for (int b = 0; b < k / QK_K; ++b) {
        int32_t isum = 0;
        for (int half = 0; half < 2; ++half) {
            const uint8_t* ql = wb[b].ql + 64 * half;
            const uint8_t* qh = wb[b].qh + 32 * half;
            for (int s = 0; s < 8; ++s) {  // sub-blocks of 16 values
                int32_t dot = 0;
                for (int l = 16 * s; l < 16 * s + 16; ++l) {
                    dot += q6_k_u6(ql, qh, l) * (int32_t)xb[b].qs[128 * half + l];
                }
                isum += (int32_t)wb[b].scales[8 * half + s] * dot;
            }
        }
        isum -= q6_k_offset_dot(wb[b], xb[b]);
        sum += (fp16_to_fp32(wb[b].d) * xb[b].d) * (float)isum;
    }
    return sum;
}

float bf16_dot_scalar(const uint8_t* w, const uint8_t* x, int k) {
    const uint16_t* wv = reinterpret_cast<const uint16_t*>(w);
    const uint16_t* xv = reinterpret_cast<const uint16_t*>(x);
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) sum += bf16_to_fp32(wv[i]) * bf16_to_fp32(xv[i]);
    return sum;
}

}  // namespace

KTLAB_GEMM_BY_ROWS(q8_0_gemm_scalar, q8_0_dot_scalar)
KTLAB_GEMM_BY_ROWS(q4_k_gemm_scalar, q4_k_dot_scalar)
KTLAB_GEMM_BY_ROWS(q6_k_gemm_scalar, q6_k_dot_scalar)
KTLAB_GEMM_BY_ROWS(q5_k_gemm_scalar, q5_k_dot_scalar)
KTLAB_GEMM_BY_ROWS(bf16_gemm_scalar, bf16_dot_scalar)

// Q8_0x16 (quant.h): the same sums as q8_0_dot_scalar, in the same order, per packed row.
KTLAB_GEMM_DECL(q8_0x16_gemm_scalar) {
    const int nb = k / QK8_0;
    for (int r0 = 0; r0 < n; r0 += kQ8x16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; ++j) {
            const block_q8_act* xb = reinterpret_cast<const block_q8_act*>(x.row(j));
            for (int i = 0; i < kQ8x16Rows; ++i) {
                float sum = 0.0f;
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* block = q8x16_block(group, b);
                    const uint8_t* q = block + 4 * i;
                    int32_t isum = 0;
                    for (int kk = 0; kk < QK8_0 / 4; ++kk) {
                        for (int p = 0; p < 4; ++p) isum += (int32_t)(int8_t)q[64 * kk + p] * xb[b].qs[4 * kk + p];
                    }
                    sum += (fp16_to_fp32(q8x16_scales(block)[i]) * xb[b].d) * (float)isum;
                }
                y[(size_t)j * ldy + r0 + i] = sum;
            }
        }
    }
}

// BF16x16 (quant.h): the same products summed in the same order as bf16_dot_scalar.
KTLAB_GEMM_DECL(bf16x16_gemm_scalar) {
    for (int r0 = 0; r0 < n; r0 += kQ8x16Rows) {
        const uint16_t* group = reinterpret_cast<const uint16_t*>(w + (size_t)r0 * row_bytes);
        for (int j = 0; j < m; ++j) {
            const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.row(j));
            for (int i = 0; i < kQ8x16Rows; ++i) {
                float sum = 0.0f;
                for (int v = 0; v < k; ++v) {
                    const int c = v / kBf16x16Chunk, kk = v % kBf16x16Chunk / 2, p = v % 2;
                    sum += bf16_to_fp32(group[c * kBf16x16Chunk * kQ8x16Rows + 2 * kQ8x16Rows * kk + 2 * i + p]) *
                           bf16_to_fp32(xr[v]);
                }
                y[(size_t)j * ldy + r0 + i] = sum;
            }
        }
    }
}

// ---- Q8_0 GEMV, scalar ------------------------------------------------------------------------

void q8_0_gemv_rows_scalar(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb,
                           float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        y[r] = q8_0_dot_scalar(w + (size_t)r * row_bytes, reinterpret_cast<const uint8_t*>(xq), nb * QK8_0);
    }
}

void q8_0_gemm_rows_scalar(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m, float* y,
                           size_t ldy, int r0, int r1) {
    for (int j = 0; j < m; ++j) {
        q8_0_gemv_rows_scalar(w, row_bytes, xq + (size_t)j * nb, nb, y + (size_t)j * ldy, r0, r1);
    }
}

// ---- drivers --------------------------------------------------------------------------------

namespace {
// Rows per task: a multiple of 16 (the AMX tile height) and independent of the thread count,
// so which kernel code computes which row never depends on `threads`.
constexpr int kRowsPerTask = 64;
// Tokens per dense GEMM task: 64 activation rows of K = 4096 are 147 KiB, which stay in L2
// while the task's weight rows stream past them.
constexpr int kTokensPerTask = 64;
}  // namespace

void quantize_q8_act(const float* x, block_q8_act* y, int64_t k, Isa isa) { kernels_for(isa).quantize_q8_act(x, y, k); }
void quantize_q8_K(const float* x, block_q8_K* y, int64_t k, Isa isa) { kernels_for(isa).quantize_q8_K(x, y, k); }

void q8_0_gemv(const uint8_t* w, const float* x, float* y, int64_t n, int64_t k, Isa isa, int threads) {
    q8_0_gemm(w, x, y, n, k, 1, isa, threads);
}

bool has_dense_q8_0x16(Isa isa) { return kernels_for(isa).dense_q8_0.gemm != nullptr; }

void q8_0_gemm(const uint8_t* w, const float* x, float* y, int64_t n, int64_t k, int64_t m, Isa isa, int threads,
               bool packed, size_t ldy) {
    if (ldy == 0) ldy = (size_t)n;
    const KernelTable& kt = kernels_for(isa);
    const FormatKernels& dense = kt.dense_q8_0;
    if (packed && (dense.gemm == nullptr || n % kQ8x16Rows != 0)) {
        throw std::invalid_argument(dense.gemm == nullptr
                                        ? std::string("the ") + isa_name(isa) + " path has no packed dense Q8_0 kernel"
                                        : "packed dense Q8_0 needs a multiple of 16 rows");
    }
    if (n <= 0 || k <= 0 || m <= 0) return;
    const int nb = (int)(k / QK8_0);
    std::vector<block_q8_act> xq((size_t)nb * (size_t)m);
    for (int64_t j = 0; j < m; ++j) kt.quantize_q8_act(x + j * k, xq.data() + j * nb, k);

    const size_t row_bytes = (size_t)nb * sizeof(block_q8_0);
    const size_t act_bytes = (size_t)nb * sizeof(block_q8_act);
    const int n_rows = (int)n;
    const int n_row_tasks = (n_rows + kRowsPerTask - 1) / kRowsPerTask;
    const int n_tok_tasks = (int)((m + kTokensPerTask - 1) / kTokensPerTask);
    const block_q8_act* xqp = xq.data();
    auto chunk_tokens = [&](int c) {  // tokens of token chunk c
        const int64_t left = m - (int64_t)c * kTokensPerTask;
        return (int)(left < kTokensPerTask ? left : kTokensPerTask);
    };
    // Packed kernels read their activations re-laid once per token chunk (the chunk's own layout).
    std::vector<uint8_t> act_pack;
    std::vector<size_t> pack_off((size_t)n_tok_tasks + 1, 0);
    if (packed && dense.pack) {
        for (int c = 0; c < n_tok_tasks; ++c) {
            pack_off[c + 1] = pack_off[c] + (dense.pack_bytes(chunk_tokens(c), (int)k) + 63) / 64 * 64;
        }
        act_pack.resize(pack_off[n_tok_tasks]);
        for (int c = 0; c < n_tok_tasks; ++c) {
            ActRows rows{reinterpret_cast<const uint8_t*>(xqp + (int64_t)c * kTokensPerTask * nb), act_bytes, nullptr,
                         nullptr};
            dense.pack(rows, chunk_tokens(c), (int)k, act_pack.data() + pack_off[c]);
        }
    }
    auto task = [&](int t) {
        const int r0 = (t % n_row_tasks) * kRowsPerTask;
        const int r1 = r0 + kRowsPerTask < n_rows ? r0 + kRowsPerTask : n_rows;
        const int c = t / n_row_tasks;
        const int64_t j0 = (int64_t)c * kTokensPerTask;
        const int mt = chunk_tokens(c);
        if (packed) {
            ActRows rows{reinterpret_cast<const uint8_t*>(xqp + j0 * nb), act_bytes, nullptr,
                         act_pack.empty() ? nullptr : act_pack.data() + pack_off[c]};
            dense.gemm(w + (size_t)r0 * row_bytes, row_bytes, r1 - r0, (int)k, rows, mt, y + j0 * ldy + r0, ldy);
        } else if (m == 1) {
            kt.q8_0_gemv_rows(w, row_bytes, xqp, nb, y, r0, r1);
        } else {
            kt.q8_0_gemm_rows(w, row_bytes, xqp + j0 * nb, nb, mt, y + j0 * ldy, ldy, r0, r1);
        }
    };
    run_parallel_ranges(n_row_tasks * n_tok_tasks, threads, task);
}

}  // namespace ktlab

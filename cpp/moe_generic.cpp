// Scalar twins of every kernel (the reference every SIMD path is tested against), the row
// quantizers, and the ISA-independent drivers that split work over the thread pool.
#include <cmath>
#include <vector>

#include "isa.h"
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

// ---- Q8_0 GEMV, scalar ------------------------------------------------------------------------

void q8_0_gemv_rows_scalar(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb,
                           float* y, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const block_q8_0* wr = reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes);
        float sum = 0.0f;
        for (int b = 0; b < nb; ++b) {
            int32_t isum = 0;
            for (int j = 0; j < QK8_0; ++j) isum += (int32_t)wr[b].qs[j] * (int32_t)xq[b].qs[j];
            sum += (fp16_to_fp32(wr[b].d) * xq[b].d) * (float)isum;
        }
        y[r] = sum;
    }
}

// ---- drivers --------------------------------------------------------------------------------

namespace {
// Rows per task: a multiple of 16 (the AMX tile height) and independent of the thread count,
// so which kernel code computes which row never depends on `threads`.
constexpr int kRowsPerTask = 64;
}  // namespace

void q8_0_gemv(const uint8_t* w, const float* x, float* y, int64_t n, int64_t k, Isa isa, int threads) {
    if (n <= 0 || k <= 0) return;
    const int nb = (int)(k / QK8_0);
    std::vector<block_q8_act> xq((size_t)nb);
    quantize_row_q8_act(x, xq.data(), k);

    const q8_0_gemv_rows_fn rows = kernels_for(isa).q8_0_gemv_rows;
    const size_t row_bytes = (size_t)nb * sizeof(block_q8_0);
    const int n_rows = (int)n;
    const int n_tasks = (n_rows + kRowsPerTask - 1) / kRowsPerTask;
    const block_q8_act* xqp = xq.data();
    if (threads <= 0) threads = default_num_threads();
    auto task = [&](int t) {
        const int r0 = t * kRowsPerTask;
        const int r1 = r0 + kRowsPerTask < n_rows ? r0 + kRowsPerTask : n_rows;
        rows(w, row_bytes, xqp, nb, y, r0, r1);
    };
    if (n_tasks == 1 || threads == 1) {
        for (int t = 0; t < n_tasks; ++t) task(t);
        return;
    }
    global_pool(threads).parallel_for(n_tasks, task, threads);
}

}  // namespace ktlab

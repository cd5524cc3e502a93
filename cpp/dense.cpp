// The dense matmul over any weight format. See dense.h.
#include "dense.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "threadpool.h"

namespace ktlab {

namespace {
constexpr int kRowsPerTask = 64;    // a multiple of 16 (one packed group)
constexpr int kTokensPerTask = 64;  // activation rows a task reads against its weight rows
}  // namespace

void dense_gemm(const DenseMatrix& w, const float* x, int64_t m, float* y, size_t ldy, Isa isa, int threads) {
    if (w.fmt == WFormat::q8_0) {
        q8_0_gemm(w.data, x, y, w.rows, w.cols, m, isa, threads, w.packed, ldy);
        return;
    }
    const KernelTable& kt = kernels_for(isa);
    const FormatKernels& fk = w.packed ? kt.packed[(int)w.fmt] : kt.fmt[(int)w.fmt];
    if (fk.gemm == nullptr || (w.packed && w.rows % 16 != 0)) {
        throw std::invalid_argument(fk.gemm == nullptr
                                        ? std::string("the ") + isa_name(isa) + " path has no packed kernel for this format"
                                        : "a packed dense matrix needs a multiple of 16 rows");
    }
    if (w.rows <= 0 || w.cols <= 0 || m <= 0) return;
    const size_t stride = act_row_bytes(w.fmt, w.cols);
    std::vector<uint8_t> xq(stride * (size_t)m);
    run_parallel((int)((m + kTokensPerTask - 1) / kTokensPerTask), threads, [&](int c) {
        const int64_t j1 = std::min<int64_t>(m, (int64_t)(c + 1) * kTokensPerTask);
        for (int64_t j = (int64_t)c * kTokensPerTask; j < j1; ++j) {
            quantize_act_row(w.fmt, x + j * w.cols, xq.data() + stride * j, w.cols, kt);
        }
    });
    const size_t row_bytes = w.row_bytes();
    const int n_rows = (int)w.rows;
    const int n_row_tasks = (n_rows + kRowsPerTask - 1) / kRowsPerTask;
    const int n_tok_tasks = (int)((m + kTokensPerTask - 1) / kTokensPerTask);
    run_parallel_ranges(n_row_tasks * n_tok_tasks, threads, [&](int t) {
        const int r0 = (t % n_row_tasks) * kRowsPerTask;
        const int r1 = std::min(r0 + kRowsPerTask, n_rows);
        const int64_t j0 = (int64_t)(t / n_row_tasks) * kTokensPerTask;
        const int mt = (int)std::min<int64_t>(kTokensPerTask, m - j0);
        const ActRows rows{xq.data() + stride * j0, stride, nullptr, nullptr};
        fk.gemm(w.data + (size_t)r0 * row_bytes, row_bytes, r1 - r0, (int)w.cols, rows, mt, y + j0 * ldy + r0, ldy);
    });
}

bool has_packed_dense(WFormat fmt, Isa isa) {
    const KernelTable& kt = kernels_for(isa);
    return fmt == WFormat::q8_0 ? kt.dense_q8_0.gemm != nullptr
                                : kt.packed[(int)fmt].gemm != nullptr && kt.packed[(int)fmt].repack != nullptr;
}

void repack_dense(WFormat fmt, const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    const repack_fn repack = kernels_for(Isa::scalar).packed[(int)fmt].repack;  // one layout on every path
    if (repack == nullptr || rows % 16 != 0) throw std::invalid_argument("no repacked layout for these rows");
    repack(raw, out, rows, k);
}

}  // namespace ktlab

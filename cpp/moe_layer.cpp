// The fused MoE layer forward. See moe_layer.h.
#include "moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ktlab {

namespace {

// Rows per task, multiples of 16 (the AMX tile height). Gate/up blocks are also whole
// activation blocks of the down format (each task quantizes its own slice of h). Untuned.
constexpr int kRowsPerTask = 64;
// Gate/up tasks: 128 rows of I (272 KiB of gate and up each at H = 2048 in Q8_0); measured a few
// percent faster on cold weights than 64 (longer streams per task).
constexpr int kRowsPerGateUpTask = 128;
constexpr size_t kNotPacked = (size_t)-1;
// Positions (token, expert pairs) up to which the down projection runs per (expert, block of
// kRowsPerDownTask rows): one 204 KiB stream of one expert per task (Q8_0, I = 768) instead
// of 64-row slices of every expert, at the price of a [positions, H] buffer (1 MiB at 128
// positions of H = 2048).
constexpr int kFewPositions = 256;
constexpr int kRowsPerDownTask = 256;

constexpr int kTokensPerTask = 16;  // tokens per quantization / slot-sum task

int round_up(int v, int to) { return (v + to - 1) / to * to; }

// Per-thread scratch, grown on demand and kept (tasks run on the pool's threads).
float* scratch_floats(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// h[i] = the ExpertMlp's activation of gate h[i] and up u[i] (+ their biases at bias_at + i).
void activate(const ExpertMlp& mlp, float* h, const float* u, size_t bias_at, int n) {
    for (int i = 0; i < n; ++i) {
        float g = h[i] + (mlp.gate_bias ? mlp.gate_bias[bias_at + i] : 0.0f);
        float up = u[i] + (mlp.up_bias ? mlp.up_bias[bias_at + i] : 0.0f);
        if (mlp.clamped) {
            g = std::min(g, mlp.limit);
            up = std::min(std::max(up, -mlp.limit), mlp.limit);
            h[i] = (up + 1.0f) * (g / (1.0f + std::exp(-mlp.alpha * g)));
        } else {
            h[i] = silu(g) * up;
        }
    }
}

// Repacked weights: 2 MiB aligned and, on Linux, in transparent huge pages where the system
// allows them (madvise mode), as numpy gives the raw arrays. The kernels stream these
// bytes; on 4 KiB pages the T=1 BF16 layer ran ~15% slower here (a TLB miss every 4 KiB).
uint8_t* alloc_weight_bytes(size_t bytes) {
    constexpr size_t kHuge = (size_t)2 << 20;
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__)
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return static_cast<uint8_t*>(p);
}

void check(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

}  // namespace

void MoeLayer::FreeBytes::operator()(uint8_t* p) const { std::free(p); }

MoeLayer::MoeLayer(int n_experts, int hidden, int inter, ExpertMatrix gate, ExpertMatrix up, ExpertMatrix down,
                   Isa isa, int threads)
    : n_experts_(n_experts), hidden_(hidden), inter_(inter), gate_(gate), up_(up), down_(down), isa_(isa),
      threads_(threads > 0 ? threads : default_num_threads()) {
    check(n_experts > 0 && hidden > 0 && inter > 0, "MoeLayer: E, H and I must be positive");
    check(gate.fmt == up.fmt, "MoeLayer: gate and up must have the same format");
    check(gate.rows == inter && gate.cols == hidden && up.rows == inter && up.cols == hidden,
          "MoeLayer: gate and up must be [E, I, H]");
    check(down.rows == hidden && down.cols == inter, "MoeLayer: down must be [E, H, I]");
    check(hidden % act_block_values(gate.fmt) == 0, "MoeLayer: H must be whole blocks of the gate/up format");
    check(inter % act_block_values(down.fmt) == 0, "MoeLayer: I must be whole blocks of the down format");
    check(gate.data && up.data && down.data, "MoeLayer: null weights");
    rows_gu_ = std::min(round_up(kRowsPerGateUpTask, std::max(act_block_values(down.fmt), 16)), inter);
    rows_down_ = std::min(kRowsPerTask, hidden);
    global_pool(threads_);  // start the workers now, not in the first call
    repack_weights();
}

// Picks raw or packed kernels per matrix and repacks (in parallel, expert by expert) where
// the path has a packed layout for the format and the rows (columns) come in whole groups
// of 16 (32).
void MoeLayer::repack_weights() {
    const KernelTable& kt = kernels_for(isa_);
    auto wants = [&](const ExpertMatrix& m) {
        return kt.packed[(int)m.fmt].repack && m.rows % 16 == 0 && m.cols % 32 == 0;
    };
    const bool pack_gu = wants(gate_), pack_down = wants(down_);
    k_gu_ = pack_gu ? &kt.packed[(int)gate_.fmt] : &kt.fmt[(int)gate_.fmt];
    k_down_ = pack_down ? &kt.packed[(int)down_.fmt] : &kt.fmt[(int)down_.fmt];
    auto packed_of = [](ExpertMatrix m) {
        m.packed = true;
        return m;
    };
    const size_t E = (size_t)n_experts_;
    const size_t bytes_gu = pack_gu ? packed_of(gate_).expert_bytes() * E : 0;
    const size_t bytes_down = pack_down ? packed_of(down_).expert_bytes() * E : 0;
    if (bytes_gu + bytes_down == 0) return;
    repacked_.reset(alloc_weight_bytes(2 * bytes_gu + bytes_down));
    uint8_t* base = repacked_.get();
    std::vector<std::pair<ExpertMatrix*, ExpertMatrix>> jobs;  // (matrix, its packed copy)
    auto add_job = [&](ExpertMatrix* m, uint8_t* at) {
        ExpertMatrix p = packed_of(*m);
        p.data = at;
        jobs.emplace_back(m, p);
    };
    if (pack_gu) {
        add_job(&gate_, base);
        add_job(&up_, base + bytes_gu);
    }
    if (pack_down) add_job(&down_, base + 2 * bytes_gu);
    run_parallel((int)(jobs.size() * E), threads_, [&](int task) {
        const auto& [m, p] = jobs[task / E];
        const int e = (int)(task % E);
        kt.packed[(int)m->fmt].repack(m->expert(e), const_cast<uint8_t*>(p.expert(e)), m->rows, m->cols);
    });
    for (auto& [m, p] : jobs) *m = p;
}

void MoeLayer::expert_gate_up(int e, const float* x, int m, float* g, float* u) const {
    check(e >= 0 && e < n_experts_, "expert id " + std::to_string(e) + " out of range");
    const KernelTable& kt = kernels_for(isa_);
    const size_t stride = act_row_bytes(gate_.fmt, hidden_);
    std::vector<uint8_t> xq(stride * (size_t)m);
    for (int j = 0; j < m; ++j) quantize_act_row(gate_.fmt, x + (size_t)j * hidden_, xq.data() + stride * j, hidden_, kt);
    ActRows rows;
    rows.base = xq.data();
    rows.stride = stride;
    const int blocks = (inter_ + kRowsPerTask - 1) / kRowsPerTask;  // tasks: (matrix, block of rows of I)
    run_parallel(2 * blocks, threads_, [&](int task) {
        const ExpertMatrix& w = task < blocks ? gate_ : up_;
        float* y = task < blocks ? g : u;
        const int r0 = (task % blocks) * kRowsPerTask, n = std::min(kRowsPerTask, inter_ - r0);
        k_gu_->gemm(w.expert(e) + w.row_bytes() * r0, w.row_bytes(), n, hidden_, rows, m, y + r0, (size_t)inter_);
    });
}

void MoeLayer::forward(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned,
                       int64_t n_tokens, int top_k, float* out) {
    check(top_k > 0, "MoeLayer: top_k must be positive");
    for (int64_t i = 0; i < n_tokens * top_k; ++i) {
        check(ids[i] >= 0 && ids[i] < n_experts_,
              "expert id " + std::to_string(ids[i]) + " out of range [0, " + std::to_string(n_experts_) + ")");
    }
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kChunkTokens) {
        const int n = (int)std::min<int64_t>(kChunkTokens, n_tokens - t0);
        run_chunk(x + t0 * hidden_, ids + t0 * top_k, weights + t0 * top_k, owned, n, top_k, out + t0 * hidden_);
    }
}

void MoeLayer::submit(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned,
                      int64_t n_tokens, int top_k, float* out) {
    async_.start([=] { forward(x, ids, weights, owned, n_tokens, top_k, out); });
}

void MoeLayer::run_chunk(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned,
                         int n_tokens, int top_k, float* out) {
    const int E = n_experts_, H = hidden_, I = inter_;
    const int n_slots = n_tokens * top_k;
    const KernelTable& kt = kernels_for(isa_);
    const FormatKernels& k_gu = *k_gu_;
    const FormatKernels& k_down = *k_down_;

    // 1. Group (token, slot) pairs by expert.
    count_.assign(E, 0);
    for (int i = 0; i < n_slots; ++i) {
        if (!owned || owned[ids[i]]) ++count_[ids[i]];
    }
    offset_.assign(E + 1, 0);
    for (int e = 0; e < E; ++e) offset_[e + 1] = offset_[e] + count_[e];
    const int n_pairs = offset_[E];
    if (n_pairs == 0) {
        std::memset(out, 0, sizeof(float) * (size_t)n_tokens * H);
        return;
    }
    fill_.assign(offset_.begin(), offset_.end() - 1);
    pos_of_.resize(n_slots);
    tok_of_.resize(n_pairs);
    for (int i = 0; i < n_slots; ++i) {
        const int e = ids[i];
        if (owned && !owned[e]) {
            pos_of_[i] = -1;
            continue;
        }
        const int p = fill_[e]++;
        pos_of_[i] = p;
        tok_of_[p] = i / top_k;
    }
    // Experts with work, biggest first (ties by id): the pool hands tasks out in this order.
    order_.clear();
    for (int e = 0; e < E; ++e) {
        if (count_[e] > 0) order_.push_back(e);
    }
    std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) { return count_[a] > count_[b]; });

    // 2. Quantize x, one activation row per token.
    const size_t xq_stride = act_row_bytes(gate_.fmt, H);
    xq_.resize(xq_stride * n_tokens);
    run_parallel((n_tokens + kTokensPerTask - 1) / kTokensPerTask, threads_, [&](int task) {
        const int t1 = std::min(n_tokens, (task + 1) * kTokensPerTask);
        for (int t = task * kTokensPerTask; t < t1; ++t) {
            quantize_act_row(gate_.fmt, x + (size_t)t * H, xq_.data() + xq_stride * t, H, kt);
        }
    });

    // Packing (AMX): activations of each big-enough expert re-laid once for the tile kernels.
    auto plan_packing = [&](const FormatKernels& fk, int k, std::vector<size_t>& off, std::vector<uint8_t>& buf) {
        off.assign(E, kNotPacked);
        size_t total = 0;
        if (fk.pack) {
            for (int e : order_) {
                const size_t bytes = count_[e] >= fk.pack_min_rows ? fk.pack_bytes(count_[e], k) : 0;
                if (bytes == 0) continue;
                off[e] = total;
                total += (bytes + 63) / 64 * 64;
            }
        }
        buf.resize(total);
        return total > 0;
    };
    auto act_rows = [&](int e, const uint8_t* base, size_t stride, const int32_t* index,
                        const std::vector<size_t>& off, const std::vector<uint8_t>& buf) {
        ActRows a;
        a.base = base;
        a.stride = stride;
        a.index = index;
        a.packed = off[e] == kNotPacked ? nullptr : buf.data() + off[e];
        return a;
    };
    auto gu_rows = [&](int e) {
        return act_rows(e, xq_.data(), xq_stride, tok_of_.data() + offset_[e], pack_off_gu_, packed_gu_);
    };
    const size_t hq_stride = act_row_bytes(down_.fmt, I);
    auto down_rows = [&](int e) {
        return act_rows(e, hq_.data() + hq_stride * offset_[e], hq_stride, nullptr, pack_off_down_, packed_down_);
    };
    auto pack_all = [&](const FormatKernels& fk, int k, const std::vector<size_t>& off, std::vector<uint8_t>& buf,
                        auto rows_of) {
        const int n = (int)order_.size();
        run_parallel(n, threads_, [&](int i) {
            const int e = order_[i];
            if (off[e] == kNotPacked) return;
            ActRows a = rows_of(e);
            a.packed = nullptr;
            fk.pack(a, count_[e], k, buf.data() + off[e]);
        });
    };
    if (plan_packing(k_gu, H, pack_off_gu_, packed_gu_)) pack_all(k_gu, H, pack_off_gu_, packed_gu_, gu_rows);

    // 3. Gate/up: tasks (expert, block of rows of I); h quantized into the down activations.
    hq_.resize(hq_stride * n_pairs);
    gu_tasks_.clear();
    for (int e : order_) {
        for (int r = 0; r < I; r += rows_gu_) gu_tasks_.emplace_back(e, r);
    }
    const size_t g_row_bytes = gate_.row_bytes();
    run_parallel_ranges((int)gu_tasks_.size(), threads_, [&](int task) {
        const int e = gu_tasks_[task].first, r0 = gu_tasks_[task].second;
        const int n = std::min(rows_gu_, I - r0), m = count_[e];
        float* g = scratch_floats((size_t)2 * m * n);
        float* u = g + (size_t)m * n;
        const ActRows xa = gu_rows(e);
        k_gu.gemm(gate_.expert(e) + g_row_bytes * r0, g_row_bytes, n, H, xa, m, g, n);
        k_gu.gemm(up_.expert(e) + g_row_bytes * r0, g_row_bytes, n, H, xa, m, u, n);
        const size_t seg = act_row_bytes(down_.fmt, r0);  // byte offset of row r0's slice
        for (int j = 0; j < m; ++j) {
            float* h = g + (size_t)j * n;
            const float* uj = u + (size_t)j * n;
            if (mlp_.gate_bias || mlp_.up_bias || mlp_.clamped) {
                activate(mlp_, h, uj, (size_t)e * I + r0, n);
            } else {
                for (int i = 0; i < n; ++i) h[i] = silu(h[i]) * uj[i];
            }
            quantize_act_row(down_.fmt, h, hq_.data() + hq_stride * (offset_[e] + j) + seg, n, kt);
        }
    });

    if (plan_packing(k_down, I, pack_off_down_, packed_down_)) {
        pack_all(k_down, I, pack_off_down_, packed_down_, down_rows);
    }

    // 4. Down (see moe_layer.h): the same dot products and slot sums either way.
    const size_t d_row_bytes = down_.row_bytes();
    auto slot_sums = [&](int t, int r0, int n, const float* y, size_t ldy) {
        float* o = out + (size_t)t * H + r0;
        std::fill(o, o + n, 0.0f);
        for (int s = 0; s < top_k; ++s) {
            const int p = pos_of_[t * top_k + s];
            if (p < 0) continue;
            const float w = weights[t * top_k + s];
            const float* yp = y + (size_t)p * ldy;
            if (mlp_.down_bias) {
                const float* bias = mlp_.down_bias + (size_t)ids[t * top_k + s] * H + r0;
                for (int i = 0; i < n; ++i) o[i] += w * (yp[i] + bias[i]);
            } else {
                for (int i = 0; i < n; ++i) o[i] += w * yp[i];
            }
        }
    };
    if (n_pairs <= kFewPositions) {  // tasks (expert, block of rows): long streams of one expert
        const int rows = std::min(kRowsPerDownTask, H);
        down_tasks_.clear();
        for (int e : order_) {
            for (int r = 0; r < H; r += rows) down_tasks_.emplace_back(e, r);
        }
        y_down_.resize((size_t)n_pairs * H);
        run_parallel_ranges((int)down_tasks_.size(), threads_, [&](int task) {
            const int e = down_tasks_[task].first, r0 = down_tasks_[task].second, n = std::min(rows, H - r0);
            k_down.gemm(down_.expert(e) + d_row_bytes * r0, d_row_bytes, n, I, down_rows(e), count_[e],
                        y_down_.data() + (size_t)offset_[e] * H + r0, (size_t)H);
        });
        run_parallel((n_tokens + kTokensPerTask - 1) / kTokensPerTask, threads_, [&](int task) {
            const int t1 = std::min(n_tokens, (task + 1) * kTokensPerTask);
            for (int t = task * kTokensPerTask; t < t1; ++t) slot_sums(t, 0, H, y_down_.data(), (size_t)H);
        });
        return;
    }
    run_parallel((H + rows_down_ - 1) / rows_down_, threads_, [&](int task) {  // blocks of rows, every expert
        const int r0 = task * rows_down_, n = std::min(rows_down_, H - r0);
        float* y = scratch_floats((size_t)n_pairs * n);
        for (int e : order_) {
            k_down.gemm(down_.expert(e) + d_row_bytes * r0, d_row_bytes, n, I, down_rows(e), count_[e],
                        y + (size_t)offset_[e] * n, n);
        }
        for (int t = 0; t < n_tokens; ++t) slot_sums(t, r0, n, y, (size_t)n);
    });
}

}  // namespace ktlab
